"""Resolve a model name to a local folder: a local path, or a Hugging Face hub repo (downloaded
into the standard HF cache with `huggingface_hub`, or found there when offline).

Token sources follow mistral.rs: `cache` (huggingface_hub's token: HF_TOKEN, else the stored
login), `env:VAR`, `literal:TOKEN`, `path:FILE`, `none` (send no token).

HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE and HF_HUB_CACHE / HF_HOME are read when a function is
called, not only when huggingface_hub was imported, so they can be set late (tests, CLI flags).
When the hub cannot be reached, huggingface_hub falls back to the cache by itself; we go
through `snapshot_download` for single files too, because its first request (repo_info) fails
at once, whereas `hf_hub_download`'s HEAD retries with back-off for ~25 s before falling back.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidRequestError, ModelLoadError

__all__ = ["DEFAULT_ALLOW_PATTERNS", "METADATA_ALLOW_PATTERNS", "resolve_file", "resolve_model_dir", "resolve_token"]

logger = logging.getLogger(__name__)

#: Configs and tokenizer files only: pass as allow_patterns to fetch a tokenizer without weights.
METADATA_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)
#: What `resolve_model_dir` fetches by default: configs, tokenizer files and safetensors weights
#: (no .bin / .pt / .gguf). With an index, only the shards it names are fetched, so Mistral repos
#: that also ship `consolidated.safetensors` are not downloaded twice.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = METADATA_ALLOW_PATTERNS + ("*.safetensors",)
_IGNORE_WITHOUT_INDEX = ["consolidated*.safetensors"]  # Mistral-native duplicate of the weights
_TRUE = {"1", "on", "yes", "true"}


def resolve_token(token_source: str = "cache") -> str | None:
    """The hub token named by a mistral.rs token source, or None.

    'cache': huggingface_hub's token (HF_TOKEN, else the stored login), None if there is none;
    'env:VAR': $VAR; 'literal:TOKEN': TOKEN; 'path:FILE': the file's contents, stripped;
    'none': None. A bad spec raises InvalidRequestError(field='token_source'); an unset
    variable or unreadable / empty file raises ModelLoadError naming it.
    """
    if not isinstance(token_source, str):
        raise InvalidRequestError(f"token_source must be a string, got {token_source!r}", field="token_source")
    if token_source == "none":
        return None
    if token_source == "cache":
        from huggingface_hub import get_token

        try:
            return get_token()
        except Exception as e:  # e.g. a failed OIDC exchange
            raise ModelLoadError(f"could not read the cached Hugging Face token: {e}") from e
    kind, sep, arg = token_source.partition(":")
    if not sep or not arg or kind not in ("env", "literal", "path"):
        raise InvalidRequestError(
            f"bad token_source {_redact(token_source)!r}: expected 'cache', 'none', 'env:VAR', "
            "'literal:TOKEN' or 'path:FILE'",
            field="token_source",
        )
    if kind == "literal":
        return arg
    if kind == "env":
        value = os.environ.get(arg, "").strip()
        if not value:
            raise ModelLoadError(f"token_source env:{arg}: environment variable {arg} is not set or empty")
        return value
    path = Path(arg).expanduser()
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ModelLoadError(f"token_source path:{arg}: cannot read token file {path}: {e.strerror or e}") from e
    if not value:
        raise ModelLoadError(f"token_source path:{arg}: token file {path} is empty")
    return value


def _redact(spec: str) -> str:
    # never echo what may be a literal token
    return spec if ":" not in spec else spec.split(":", 1)[0] + ":..."


def _hub_token(token_source: str) -> str | bool | None:
    # huggingface_hub reads token=None as "use the stored token"; False sends none.
    if token_source == "none":
        return False
    token = resolve_token(token_source)
    return token if token is not None else False


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return os.path.expandvars(os.path.expanduser(env[var]))
    if env.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(env["HF_HOME"])), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).is_absolute()
    )


def _local(name: str) -> Path | None:
    """The local path `name` names, or None when it must be a hub repo id."""
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if _looks_like_path(name):
        raise ModelLoadError(f"local path {name!r} does not exist")
    return None


def _check_repo_id(name: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError as e:
        raise ModelLoadError(f"{name!r} is neither an existing local path nor a valid hub repo id: {e}") from e


def _hub_call(what: str, repo_id: str, revision: str | None, offline: bool, fn, **kwargs) -> Path:
    """Run a huggingface_hub download and turn its errors into ModelLoadError."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache_dir = _cache_dir()
    rev = f" (revision {revision!r})" if revision else ""
    try:
        return Path(fn(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline, **kwargs))
    except GatedRepoError as e:
        raise ModelLoadError(
            f"{repo_id} is a gated repo: accept its terms on huggingface.co and pass a token with access "
            f"(token_source 'cache' after `hf auth login`, or 'env:HF_TOKEN'): {e}"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"{repo_id} was not found on the Hugging Face hub (or it is private and the token has no access)"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{repo_id} has no revision {revision!r}") from e
    except IncompleteSnapshotError as e:
        raise ModelLoadError(f"{repo_id}{rev} is only partly in the local hub cache and the hub "
                             f"could not be used to complete it: {e}") from e
    except LocalEntryNotFoundError as e:
        reason = (
            "hub access is disabled (offline mode: HF_HUB_OFFLINE=1 or offline=True)"
            if offline
            else f"hub access failed ({e.__cause__ or e})"
        )
        raise ModelLoadError(
            f"{what} of {repo_id}{rev} is not in the local hub cache ({cache_dir}) and {reason}"
        ) from e
    except EntryNotFoundError as e:
        raise ModelLoadError(f"{what} is not in {repo_id}{rev}") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"hub error while fetching {repo_id}{rev}: {e}") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not fetch {repo_id}{rev} from the hub: {e}") from e
    except Exception as e:  # httpx errors that huggingface_hub lets through (e.g. proxy errors)
        raise ModelLoadError(f"could not reach the hub for {repo_id}{rev}: {type(e).__name__}: {e}") from e


def _snapshot_download(repo_id: str, **kwargs) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def _snapshot(repo_id: str, revision: str | None, token, offline: bool, allow, ignore=None) -> Path:
    return _hub_call(
        "the model", repo_id, revision, offline, _snapshot_download,
        token=token, allow_patterns=list(allow), ignore_patterns=ignore,
    )


def _tree_cached(repo_id: str, commit: str) -> bool:
    from huggingface_hub import get_cached_repo_tree

    try:
        get_cached_repo_tree(repo_id, revision=commit, cache_dir=_cache_dir())
        return True
    except Exception:
        return False


def _shards(folder: Path) -> list[str] | None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"bad safetensors index {index}: {e}") from e


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(folder.glob("*.gguf"))


def resolve_model_dir(
    model: str,
    *,
    revision: str | None = None,
    token_source: str = "cache",
    allow_patterns: Sequence[str] | None = None,
    offline: bool | None = None,
) -> Path:
    """Folder holding the model's files.

    A local folder is returned as is (resolved; it must hold config.json or a .gguf). Otherwise
    `model` is a hub repo id: `snapshot_download` fetches DEFAULT_ALLOW_PATTERNS (or
    `allow_patterns`) into the HF cache, showing huggingface_hub's progress bars, and the
    snapshot folder is returned (with explicit allow_patterns, config.json is not required).
    Offline (offline=True, or HF_HUB_OFFLINE=1 when offline is None)
    reads the cache only; so does a failed hub connection. A miss raises ModelLoadError.
    """
    local = _local(model)
    if local is not None:
        if not local.is_dir():
            raise ModelLoadError(f"{model!r} is a file, not a model folder (a .gguf file is named with resolve_file)")
        if not _has_model(local):
            raise ModelLoadError(f"local folder {str(local)!r} has no config.json and no .gguf file")
        return local

    _check_repo_id(model)
    token = _hub_token(token_source)
    is_offline = _is_offline(offline)
    if allow_patterns is not None:
        folder = _snapshot(model, revision, token, is_offline, allow_patterns)
        if not folder.is_dir():
            raise ModelLoadError(f"{model}: no file matches {list(allow_patterns)} (snapshot {folder})")
        return folder

    folder = _snapshot(model, revision, token, is_offline, METADATA_ALLOW_PATTERNS)
    shards = _shards(folder)
    # The folder name is the commit: pin it so both calls see the same revision. A successful
    # online call caches the repo's file listing; without it the hub was unreachable and we
    # stay on the cache (an online call pinned to a commit would retry for ~25 s first).
    second_offline = is_offline or not _tree_cached(model, folder.name)
    if shards is not None:
        folder = _snapshot(model, folder.name, token, second_offline, shards)
    else:
        folder = _snapshot(model, folder.name, token, second_offline, ["*.safetensors"], _IGNORE_WITHOUT_INDEX)
    if not _has_model(folder):
        raise ModelLoadError(
            f"{model}{f' (revision {revision!r})' if revision else ''} has no config.json"
            f"{' in the local hub cache' if is_offline else ''} (snapshot {folder}); "
            "for a GGUF-only repo, name the file"
        )
    missing = [s for s in shards or () if not (folder / s).is_file()]
    if missing:
        raise ModelLoadError(
            f"{model}: weight files missing from {folder}: {', '.join(missing[:3])}"
            f"{f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''}"
            f"{'; the model is only partly cached and hub access is disabled (offline)' if is_offline else ''}"
        )
    if shards is None and not any(folder.glob("*.safetensors")) and (folder / "config.json").is_file():
        logger.warning("%s has no safetensors weights (only .safetensors are fetched by default)", model)
    logger.info("model %s resolved to %s", model, folder)
    return folder


def resolve_file(
    repo_or_dir: str,
    filename: str,
    *,
    revision: str | None = None,
    token_source: str = "cache",
    offline: bool | None = None,
) -> Path:
    """One file: `repo_or_dir/filename` for a local folder, else fetched from the hub repo into
    the HF cache (snapshot_download of that one file; cache only when offline or unreachable).
    A missing file raises ModelLoadError."""
    local = _local(repo_or_dir)
    if local is not None:
        if not local.is_dir():
            raise ModelLoadError(f"{repo_or_dir!r} is a file, not a folder")
        path = local / filename
        if not path.is_file():
            raise ModelLoadError(f"{filename!r} not found in local folder {str(local)!r}")
        return path

    _check_repo_id(repo_or_dir)
    is_offline = _is_offline(offline)
    folder = _hub_call(
        repr(filename), repo_or_dir, revision, is_offline, _snapshot_download,
        token=_hub_token(token_source), allow_patterns=[glob.escape(filename)],
    )
    path = folder / filename
    if not path.is_file():
        rev = f" (revision {revision!r})" if revision else ""
        cache_only = is_offline or not _tree_cached(repo_or_dir, folder.name)
        where = "the local hub cache, and the hub was not used" if cache_only else "the repo"
        raise ModelLoadError(f"{filename!r} of {repo_or_dir}{rev} is not in {where}")
    return path
