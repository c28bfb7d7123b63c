"""`mistralpy quantize`: write a float Hugging Face checkpoint as a quantized GGUF file."""
from __future__ import annotations

import argparse
from pathlib import Path

TYPES_HELP = ("Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2K Q3K Q4K Q5K Q6K IQ4_NL IQ4_XS, bits 2/3/4/5/6/8, "
              "or F16 / BF16 / F32 for an unquantized file")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True,
                   help="hub model id or local folder (config.json + safetensors + tokenizer.json)")
    p.add_argument("--isq", required=True, help=f"type of the linear weights: {TYPES_HELP}")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write (e.g. model.Q4_K.gguf)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--token-source", default="cache",
                   help="hub token: cache | env:VAR | literal:TOKEN | path:FILE | none (default: cache)")
    p.add_argument("--arch", help="override the architecture named in config.json (e.g. LlamaForCausalLM)")
    p.add_argument("--name", help="general.name written into the file (default: the model folder's name)")


def quantize_command(args: argparse.Namespace) -> int:
    from mistralpy.errors import InvalidRequestError
    from mistralpy.loading.hub import resolve_model_dir
    from mistralpy.quant.gguf.writer import parse_export_type, write_gguf

    out = Path(args.output)
    # Cheap checks first, so a typo does not cost a download.
    qtype = parse_export_type(args.isq)
    if out.exists() and not args.force:
        raise InvalidRequestError(f"{out} exists (pass --force to overwrite it)", "output")
    if out.suffix.lower() != ".gguf":
        raise InvalidRequestError(f"output {out} should end in .gguf", "output")
    model_dir = resolve_model_dir(args.model, revision=args.revision, token_source=args.token_source)
    name = args.name or (args.model.rstrip("/").split("/")[-1] if not Path(args.model).exists() else None)
    summary = write_gguf(model_dir, out, qtype, arch=args.arch, name=name, overwrite=args.force)
    print(summary.line())
    return 0
