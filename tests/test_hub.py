"""Hub resolution against a fake Hugging Face cache; the network is blocked (fails at once)."""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from mistralpy.errors import InvalidRequestError, ModelLoadError
from mistralpy.loading import hub
from mistralpy.loading.hub import DEFAULT_ALLOW_PATTERNS, resolve_file, resolve_model_dir, resolve_token

COMMIT = "a" * 40
COMMIT2 = "b" * 40
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}).encode()


def _is_loopback(host) -> bool:
    return str(host) in ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def hub_sandbox(tmp_path, monkeypatch):
    """Fresh HF cache, offline, no token; any non-loopback network use fails immediately."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE",
                "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    attempts: list = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "network blocked in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            attempts.append(address)
            raise ConnectionRefusedError("network blocked in tests")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def _cache() -> Path:
    import os

    return Path(os.environ["HF_HUB_CACHE"])


def add_cached_repo(repo_id: str, files: dict[str, bytes], commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Write the layout huggingface_hub reads: models--org--name/{blobs,refs,snapshots}."""
    repo = _cache() / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snapshot


# ---------------------------------------------------------------- token sources


def test_token_sources(tmp_path, monkeypatch):
    assert resolve_token("none") is None
    assert resolve_token("literal:hf_abc") == "hf_abc"
    monkeypatch.setenv("MY_TOKEN", " hf_env \n")
    assert resolve_token("env:MY_TOKEN") == "hf_env"
    f = tmp_path / "tok"
    f.write_text("  hf_file\n")
    assert resolve_token(f"path:{f}") == "hf_file"


def test_token_cache_source(monkeypatch):
    assert resolve_token() is None  # nothing stored
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_stored\n")
    assert resolve_token("cache") == "hf_stored"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")  # huggingface_hub's own precedence
    assert resolve_token("cache") == "hf_from_env"


def test_token_missing_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    with pytest.raises(ModelLoadError, match="NO_SUCH_TOKEN_VAR"):
        resolve_token("env:NO_SUCH_TOKEN_VAR")
    missing = tmp_path / "missing_token"
    with pytest.raises(ModelLoadError, match="missing_token"):
        resolve_token(f"path:{missing}")
    empty = tmp_path / "empty_token"
    empty.write_text("\n")
    with pytest.raises(ModelLoadError, match="empty"):
        resolve_token(f"path:{empty}")


@pytest.mark.parametrize("spec", ["", "foo", "env:", "literal", "http:x", "Literal:x", "token:secret", 123])
def test_token_bad_spec(spec):
    with pytest.raises(InvalidRequestError) as info:
        resolve_token(spec)
    assert info.value.field == "token_source"
    assert "secret" not in str(info.value)  # a mistyped literal token is not echoed


# ---------------------------------------------------------------- local folders


def test_local_folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_dir(str(d))
    (d / "config.json").write_bytes(CONFIG)
    assert resolve_model_dir(str(d)) == d.resolve()
    g = tmp_path / "gguf"
    g.mkdir()
    (g / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert resolve_model_dir(str(g)) == g.resolve()
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir("./no/such/dir")
    with pytest.raises(ModelLoadError, match="file"):
        resolve_model_dir(str(d / "config.json"))


def test_local_resolve_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_file(str(tmp_path), "m.gguf") == tmp_path.resolve() / "m.gguf"
    with pytest.raises(ModelLoadError, match="x.gguf"):
        resolve_file(str(tmp_path), "x.gguf")


# ---------------------------------------------------------------- hub cache, offline


def test_offline_cached_repo(hub_sandbox):
    snap = add_cached_repo("org/tiny", {"config.json": CONFIG, "tokenizer.json": b"{}", "model.safetensors": b"w"})
    folder = resolve_model_dir("org/tiny")
    assert folder == snap
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "model.safetensors").read_bytes() == b"w"
    assert resolve_file("org/tiny", "tokenizer.json") == snap / "tokenizer.json"
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        resolve_file("org/tiny", "model.gguf")
    assert not hub_sandbox  # no network attempt at all


def test_offline_sharded_repo_and_partial_cache():
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": CONFIG, "model.safetensors.index.json": json.dumps(index).encode(),
             "model-00001-of-00002.safetensors": b"1", "model-00002-of-00002.safetensors": b"2"}
    snap = add_cached_repo("org/sharded", files)
    assert resolve_model_dir("org/sharded") == snap
    del files["model-00002-of-00002.safetensors"]
    add_cached_repo("org/partial", files)
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        resolve_model_dir("org/partial")


def test_offline_revisions():
    main = add_cached_repo("org/revs", {"config.json": CONFIG})
    v1 = add_cached_repo("org/revs", {"config.json": b'{"v": 1}'}, commit=COMMIT2, ref="v1")
    assert resolve_model_dir("org/revs") == main
    assert resolve_model_dir("org/revs", revision="v1") == v1
    assert resolve_model_dir("org/revs", revision=COMMIT2) == v1
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        resolve_model_dir("org/revs", revision="v2")


def test_offline_miss(hub_sandbox):
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir("org/not-cached")
    msg = str(info.value)
    assert "org/not-cached" in msg and "not in the local hub cache" in msg and "offline" in msg
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        resolve_file("org/not-cached", "model.gguf")
    assert not hub_sandbox


def test_offline_argument_wins(monkeypatch, hub_sandbox):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snap = add_cached_repo("org/tiny", {"config.json": CONFIG})
    assert resolve_model_dir("org/tiny", offline=True) == snap
    with pytest.raises(ModelLoadError, match="offline"):
        resolve_model_dir("org/absent", offline=True)
    assert not hub_sandbox


def test_network_failure_falls_back_to_cache(monkeypatch, hub_sandbox):
    """Online mode with an unreachable hub (connection refused at once) reads the cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    snap = add_cached_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": b"w"})
    assert resolve_model_dir("org/tiny") == snap
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir("org/absent")
    assert "not in the local hub cache" in str(info.value) and "hub access failed" in str(info.value)
    with pytest.raises(ModelLoadError, match="hub access failed"):
        resolve_file("org/absent", "model.gguf")
    assert not hub_sandbox  # only loopback was tried


def test_bad_repo_id():
    with pytest.raises(ModelLoadError, match="valid hub repo id"):
        resolve_model_dir("bad repo!!")


# ---------------------------------------------------------------- what is asked of huggingface_hub


def test_download_requests(monkeypatch, tmp_path):
    """Default patterns, shards from the index, token and offline flags passed to snapshot_download."""
    snap = tmp_path / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes(CONFIG)
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw)
        if kw["allow_patterns"] == ["model-1.safetensors"]:
            (snap / "model-1.safetensors").write_bytes(b"w")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    # no cached file listing after the first call = it fell back to the cache: stay offline
    resolve_model_dir("org/m", offline=False)
    assert [c["local_files_only"] for c in calls] == [False, True]
    calls.clear()
    monkeypatch.setattr(hub, "_tree_cached", lambda repo_id, commit: True)  # the hub answered
    resolve_model_dir("org/m", token_source="literal:hf_x", offline=False)
    first, second = calls
    assert first["token"] == "hf_x" and first["local_files_only"] is False and first["revision"] is None
    assert second["local_files_only"] is False
    assert set(first["allow_patterns"]) | {"*.safetensors"} == set(DEFAULT_ALLOW_PATTERNS)
    assert not any(p.endswith((".bin", ".pt", ".pth", ".gguf")) for p in DEFAULT_ALLOW_PATTERNS)
    assert second["allow_patterns"] == ["*.safetensors"] and second["revision"] == COMMIT
    assert second["ignore_patterns"] == ["consolidated*.safetensors"]

    calls.clear()
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    resolve_model_dir("org/m", token_source="none", revision="dev")
    first, second = calls
    assert first["token"] is False and first["local_files_only"] is True and first["revision"] == "dev"
    assert second["allow_patterns"] == ["model-1.safetensors"]

    calls.clear()
    assert resolve_file("org/m", "config.json", offline=False) == snap / "config.json"
    assert calls[0]["allow_patterns"] == ["config.json"] and calls[0]["local_files_only"] is False
    calls.clear()
    (snap / "odd[1].gguf").write_bytes(b"GGUF")
    assert resolve_file("org/m", "odd[1].gguf", offline=True) == snap / "odd[1].gguf"
    assert calls[0]["allow_patterns"] == ["odd[[]1].gguf"] and calls[0]["local_files_only"] is True

    calls.clear()
    resolve_model_dir("org/m", allow_patterns=["tokenizer.json"], offline=False)
    assert [c["allow_patterns"] for c in calls] == [["tokenizer.json"]]
    assert calls[0]["token"] is False  # 'cache' with nothing stored sends no token
    assert hub._cache_dir() == calls[0]["cache_dir"]


def test_engine_loads_a_gguf_file_from_a_cached_hub_repo(hub_sandbox):
    """`-m REPO -f FILE`: the GGUF alone, from the hub cache, offline (the real SmolLM2 file)."""
    from assets import smollm2_gguf_path
    from mistralpy import Engine, SamplingParams

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    add_cached_repo("org/smol-gguf", {name: smollm2_gguf_path().read_bytes()})
    with Engine("org/smol-gguf", gguf_file=name, max_model_len=256, num_kv_blocks=32) as engine:
        out = engine.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
        assert out[0].outputs[0].token_ids
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        Engine("org/smol-gguf", gguf_file="other.gguf")
    assert not hub_sandbox
