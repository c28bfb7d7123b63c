"""mistral.rs's command lines, rewritten onto ours before argparse sees them.

mistral.rs puts engine options before a model-kind subcommand and picks the mode with them:

    mistralpy -i run -m MODEL                   -> mistralpy run -m MODEL        (interactive chat)
    mistralpy --port 1234 run -m MODEL          -> mistralpy serve -m MODEL --port 1234
    mistralpy --isq 4 -i plain -m ID -a llama   -> mistralpy run -m ID --arch LlamaForCausalLM --isq 4
    mistralpy --port 1234 gguf -m REPO -f FILE -t TOK  -> mistralpy serve -m REPO -f FILE -t TOK --port 1234

``--port`` selects serve, anything else the interactive ``run``. A command line already in our
shape (nothing but -v before run/serve/quantize) is returned unchanged.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from mistralpy.errors import MistralPyError


class LegacyCommandError(MistralPyError):
    """A mistral.rs command line that cannot be mapped (an unsupported model kind or option)."""


MODERN = ("run", "serve", "quantize")
LEGACY_KINDS = ("plain", "gguf")  # "run" (mistral.rs's auto loader) is also a legacy kind before our subcommand
UNSUPPORTED_KINDS = {
    "x-lora": "X-LoRA adapters", "lora": "LoRA adapters", "ggml": "GGML files (convert them to GGUF)",
    "x-lora-gguf": "X-LoRA adapters", "lora-gguf": "LoRA adapters", "x-lora-ggml": "GGML files",
    "lora-ggml": "GGML files", "vision-plain": "vision models", "diffusion-plain": "image generation models",
    "diffusion": "image generation models", "speech": "speech models", "embedding": "embedding models",
    "multi-model": "multi-model loading from the CLI (use `mistralpy serve --config models.toml`)",
}


def _arch(value: str) -> str:
    from mistralpy.compat.which import arch_class_name

    return arch_class_name(value) or value


def _tokenizer(value: str) -> str:
    # mistral.rs takes a tokenizer.json file; ours a folder (or hub id) holding it.
    from pathlib import Path

    path = Path(value).expanduser()
    return str(path.parent) if path.is_file() else value


def _pa_gpu_mem(value: str) -> list[str]:
    mb = float(value)  # mistral.rs: MB when > 1, else a fraction of GPU memory (ours defaults to 85%)
    return ["--kv-cache-memory-gb", f"{mb / 1024:g}"] if mb > 1 else []


# Options before the subcommand: name -> (our option or None = ignored, takes a value, value converter).
Conv = Callable[[str], "str | list[str]"] | None
GLOBAL: dict[str, tuple[str | None, bool, Conv]] = {
    "--port": ("--port", True, None),
    "-p": ("--port", True, None),
    "--serve-ip": ("--host", True, None),
    "--isq": ("--isq", True, None),
    "--in-situ-quant": ("--isq", True, None),
    "--token-source": ("--token-source", True, None),
    "--chat-template": ("--chat-template", True, None),
    "-c": ("--chat-template", True, None),
    "--jinja-explicit": ("--chat-template", True, None),
    "-j": ("--chat-template", True, None),
    "--seed": ("--seed", True, None),
    "--mcp-config": ("--mcp-config", True, None),
    "--mcp-port": ("--mcp-port", True, None),
    "--max-seqs": ("--max-seqs", True, None),
    "--pa-blk-size": ("--block-size", True, None),
    "--prompt-batchsize": ("--max-num-batched-tokens", True, None),
    "--prompt-chunksize": ("--max-num-batched-tokens", True, None),
    "--pa-gpu-mem": ("", True, _pa_gpu_mem),
    "--log": (None, True, None),
    "--prefix-cache-n": (None, True, None),
    "--num-device-layers": (None, True, None),
    "-n": (None, True, None),
    "--pa-ctxt-len": (None, True, None),
    "--pa-cache-type": (None, True, None),
    "--no-kv-cache": (None, False, None),
    "--no-paged-attn": (None, False, None),
    "--paged-attn": (None, False, None),
    "--truncate-sequence": (None, False, None),
    "--throughput": (None, False, None),
    "--enable-search": ("--enable-search", False, None),
    "--cpu": ("--device=cpu", False, None),
}
INTERACTIVE = ("-i", "--interactive-mode")
KEEP_FIRST = ("-v", "--verbose")  # our own options before the subcommand

# Options after plain / gguf / run: name -> (our option or None = ignored, takes a value, value converter).
MODEL: dict[str, tuple[str | None, bool, Conv]] = {
    "-m": ("-m", True, None), "--model-id": ("-m", True, None), "--quantized-model-id": ("-m", True, None),
    "-f": ("-f", True, None), "--quantized-filename": ("-f", True, None),
    "-t": ("-t", True, _tokenizer), "--tokenizer-json": ("-t", True, _tokenizer), "--tok-model-id": ("-t", True, None),
    "-a": ("--arch", True, _arch), "--arch": ("--arch", True, _arch),
    "-d": ("--dtype", True, None), "--dtype": ("--dtype", True, None),
    "--topology": ("--topology", True, None), "--max-seq-len": ("--max-model-len", True, None),
    "--hf-cache": (None, True, None), "--max-batch-size": (None, True, None), "--max-edge": (None, True, None),
    "--calibration-file": (None, True, None), "--imatrix": (None, True, None),
}
REFUSED = ("--from-uqff", "--write-uqff", "--adapters-model-id", "--xlora-model-id", "--order")


def _split(tok: str) -> tuple[str, str | None]:
    if tok.startswith("--") and "=" in tok:
        name, value = tok.split("=", 1)
        return name, value
    return tok, None


def _translate(tokens: list[str], table: dict[str, tuple[str | None, bool, Conv]], notes: list[str],
               passthrough: bool) -> tuple[list[str], set[str]]:
    """Rewrite options by ``table``; returns (our tokens, the legacy names seen)."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        name, value = _split(tokens[i])
        i += 1
        if name in REFUSED:
            raise LegacyCommandError(f"{name} is not supported by mistral.py")
        if name not in table:
            if not passthrough:
                raise LegacyCommandError(f"unknown option before the subcommand: {tokens[i - 1]!r}")
            out.append(tokens[i - 1])
            continue
        ours, takes_value, conv = table[name]
        seen.add(name)
        if takes_value and value is None:
            if i >= len(tokens):
                raise LegacyCommandError(f"{name} needs a value")
            value, i = tokens[i], i + 1
        if ours is None:
            notes.append(f"{name} has no effect in mistral.py (ignored)")
            continue
        if conv is not None and value is not None:
            converted = conv(value)
            if isinstance(converted, list):
                out.extend(converted)
                continue
            value = converted
        out.extend([ours] if value is None else [ours, value])
    return out, seen


def _find_subcommand(argv: list[str]) -> int | None:
    """Index of the first token naming a subcommand, skipping the values of options before it."""
    i = 0
    while i < len(argv):
        name, inline = _split(argv[i])
        if not name.startswith("-"):
            return i
        entry = GLOBAL.get(name)
        i += 2 if entry is not None and entry[1] and inline is None else 1
    return None


def rewrite(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our argv, notes for the user). Raises LegacyCommandError for what cannot be mapped."""
    k = _find_subcommand(argv)
    if k is None:
        return argv, []
    pre, sub, rest = argv[:k], argv[k], argv[k + 1:]
    keep = [t for t in pre if t in KEEP_FIRST]
    pre = [t for t in pre if t not in KEEP_FIRST]
    if sub in UNSUPPORTED_KINDS:
        raise LegacyCommandError(f"`{sub}` models are not supported yet: mistral.py does not implement "
                                 f"{UNSUPPORTED_KINDS[sub]}; use `plain`, `gguf` or `run`")
    if sub in MODERN and not pre:
        return argv, []  # already ours
    if sub not in MODERN and sub not in LEGACY_KINDS:
        return argv, []  # let argparse report it
    notes: list[str] = []
    interactive = any(t in INTERACTIVE for t in pre)
    options, seen = _translate([t for t in pre if t not in INTERACTIVE], GLOBAL, notes, passthrough=False)
    if sub in LEGACY_KINDS or sub == "run":
        mode = "serve" if {"--port", "-p", "--mcp-port"} & set(seen) or sub == "serve" else "run"
        if interactive and mode == "serve":
            raise LegacyCommandError("choose one of -i (interactive) and --port (server)")
        rest, _ = _translate(rest, MODEL, notes, passthrough=True)
    else:
        mode = sub  # serve / quantize with options moved after it
    if mode == "run":
        dropped = [o for o in ("--port", "--host", "--mcp-port") if o in options]
        if dropped:
            raise LegacyCommandError(f"{dropped[0]} needs server mode")
    return [*keep, mode, *rest, *options], notes


def apply(argv: list[str] | None) -> list[str]:
    """The argv for our parser (sys.argv[1:] when None); exits with status 2 on an unmappable line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        new, notes = rewrite(argv)
    except LegacyCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if new != argv and any(t in KEEP_FIRST for t in new):
        print("note: mistral.rs command line run as: mistralpy " + " ".join(new), file=sys.stderr)
    return new
