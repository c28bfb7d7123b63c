"""Multi-model serving: a TOML config, selection by `model`, "default", GET /v1/models, unload/reload,
404 / 503, driven with the openai client against a real uvicorn (and once through `mistralpy serve --config`)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from fixtures_models import build_checkpoint
from fixtures_server import free_port, running_server

from mistralpy.errors import InvalidRequestError
from mistralpy.server import ServerOptions, create_app
from mistralpy.server.registry import ModelRegistry, load_config

KEY = "admin-key"
CHAT = [{"role": "user", "content": "Hello there, how are you?"}]
TINY = 'dtype = "f32"\nnum_kv_blocks = 32\nmax_model_len = 128\nmax_seqs = 4\n'



@pytest.fixture(scope="module")
def config(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("multi")
    a = build_checkpoint(root / "a", "llama", tokenizer_dir, seed=1)
    b = build_checkpoint(root / "b", "qwen3", tokenizer_dir, seed=2, head_dim=32)
    path = root / "models.toml"
    path.write_text(f'[[models]]\nname = "alpha"\nmodel = "{a}"\n{TINY}\n'
                    f'[[models]]\nname = "beta"\nm = "{b}"\naliases = ["b"]\ndefault = true\n{TINY}')
    return path


@pytest.fixture(scope="module")
def server(config):
    registry = ModelRegistry.from_specs(load_config(config))
    app = create_app(registry, ServerOptions(api_key=KEY, log_interval_s=0))
    with running_server(app) as base:
        yield base, registry
    registry.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _chat(client, model: str):
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})


def test_list_and_select(server, client):
    _, registry = server
    models = client.models.list().data
    assert [m.id for m in models] == ["alpha", "beta"]
    assert [m.model_extra["status"] for m in models] == ["loaded", "loaded"]
    assert [m.model_extra["default"] for m in models] == [False, True]
    a, b = _chat(client, "alpha"), _chat(client, "beta")
    assert (a.model, b.model) == ("alpha", "beta") and a.choices[0].message.content != b.choices[0].message.content
    # each answer is its own engine's greedy answer
    native = registry.entries["alpha"].engine.engine.chat(CHAT, max_tokens=6, temperature=0, ignore_eos=True)
    assert a.choices[0].message.content == native.choices[0].message.content
    assert _chat(client, "default").choices[0].message.content == b.choices[0].message.content
    assert _chat(client, "b").model == "beta"  # alias
    text = client.completions.create(model="alpha", prompt="Once upon", max_tokens=3, temperature=0)
    assert text.model == "alpha" and text.usage.completion_tokens >= 1
    assert client.models.retrieve("alpha").id == "alpha"


def test_unknown_model_is_404(server, client):
    base, _ = server
    with pytest.raises(openai.NotFoundError) as exc:
        _chat(client, "gamma")
    assert exc.value.code == "model_not_found" and "alpha" in exc.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="x", max_tokens=1)
    r = httpx.post(base + "/v1/models/gamma/unload", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404
    r = httpx.post(base + "/tokenize", json={"model": "gamma", "prompt": "hi"},
                   headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404


def test_unload_reload(server, client):
    base, registry = server
    auth = {"authorization": f"Bearer {KEY}"}
    before = _chat(client, "alpha").choices[0].message.content
    assert httpx.post(base + "/v1/models/alpha/unload").status_code == 401  # admin routes need the key
    r = httpx.post(base + "/v1/models/alpha/unload", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert registry.entries["alpha"].engine is None
    with pytest.raises(openai.APIStatusError) as exc:
        _chat(client, "alpha")
    assert exc.value.status_code == 503 and "reload" in exc.value.message
    assert [m.model_extra["status"] for m in client.models.list().data] == ["unloaded", "loaded"]
    assert _chat(client, "beta").model == "beta"  # the other model is untouched
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["models"] == {"alpha": "unloaded", "beta": "loaded"}
    r = httpx.post(base + "/v1/models/alpha/reload", headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    assert _chat(client, "alpha").choices[0].message.content == before
    r = httpx.post(base + "/v1/models/alpha/reload", headers=auth, timeout=60)  # already loaded: a no-op
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    # unloading the default keeps /metrics answering from a loaded model
    assert httpx.post(base + "/v1/models/default/unload", headers=auth, timeout=30).json()["id"] == "beta"
    assert "mistralpy_kv_cache_blocks_total" in httpx.get(base + "/metrics").text
    with pytest.raises(openai.APIStatusError) as exc:
        _chat(client, "default")
    assert exc.value.status_code == 503
    assert httpx.post(base + "/v1/models/beta/reload", headers=auth, timeout=60).json()["status"] == "loaded"


def test_config_errors(tmp_path):
    def load(text: str):
        path = tmp_path / "m.toml"
        path.write_text(text)
        return load_config(path)

    specs = load('default = "y"\n[[models]]\nname = "x"\nmodel = "p"\nisq = "Q4K"\n'
                 '[[models]]\nname = "y"\nmodel = "q"\ngguf-file = "f.gguf"\n')
    assert [(s.name, s.default) for s in specs] == [("x", False), ("y", True)]
    assert specs[0].options == {"isq": "Q4K"} and specs[1].options == {"gguf_file": "f.gguf"}
    assert load('[[models]]\nmodel = "p"\n')[0].name == "p" and load('[[models]]\nmodel = "p"\n')[0].default
    for text, match in [('[[models]]\nname = "x"\n', "needs model"),
                        ('[[models]]\nmodel = "p"\nbogus = 1\n', "unknown keys"),
                        ('[[models]]\nname = "x"\nmodel = "p"\n[[models]]\nname = "x"\nmodel = "q"\n', "unique"),
                        ('[[models]]\nname = "default"\nmodel = "p"\n', "unique"),
                        ('[[models]]\nmodel = "p"\ndefault = true\n[[models]]\nmodel = "q"\ndefault = true\n',
                         "several"),
                        ('default = "z"\n[[models]]\nmodel = "p"\n', "names no model"),
                        ("x = 1\n", "models")]:
        with pytest.raises(InvalidRequestError, match=match):
            load(text)


def test_serve_config_cli(config, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "mistralpy.cli.main", "serve", "--config", str(config),
                                 "--port", str(port), "--log-interval", "0"],
                                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["alpha", "beta"]
        assert _chat(client, "alpha").model == "alpha"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
