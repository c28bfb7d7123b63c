"""mistral.rs's command lines (`mistralpy -i run -m X`, `--port 1234 gguf -m R -f F`, ...) mapped onto ours."""
from __future__ import annotations

import subprocess
import sys

import pytest
from fixtures_models import build_checkpoint

from mistralpy import Engine
from mistralpy.cli.legacy import LegacyCommandError, rewrite
from mistralpy.cli.main import build_parser


def ours(*argv: str) -> list[str]:
    new, _ = rewrite(list(argv))
    build_parser().parse_args(new)  # what the rewrite gives must parse
    return new


def test_modern_lines_unchanged():
    for argv in (["run", "-m", "x", "-i", "hello"], ["serve", "-m", "x", "--port", "8000"], ["-v", "run"],
                 ["quantize", "-m", "a", "-o", "b.gguf", "--type", "Q4K"], ["run"], []):
        assert rewrite(argv) == (argv, [])


def test_interactive_and_server_modes():
    assert ours("-i", "run", "-m", "M") == ["run", "-m", "M"]
    assert ours("--port", "1234", "run", "-m", "M") == ["serve", "-m", "M", "--port", "1234"]
    assert ours("--port=1234", "--serve-ip", "0.0.0.0", "plain", "-m", "M") == \
        ["serve", "-m", "M", "--port", "1234", "--host", "0.0.0.0"]
    assert ours("-i", "plain", "-m", "M", "-a", "llama") == ["run", "-m", "M", "--arch", "LlamaForCausalLM"]
    assert ours("plain", "-m", "M", "--arch", "qwen3", "-d", "bf16") == \
        ["run", "-m", "M", "--arch", "Qwen3ForCausalLM", "--dtype", "bf16"]
    assert ours("--port", "1234", "gguf", "-m", "REPO", "-f", "F.gguf", "-t", "TOK") == \
        ["serve", "-m", "REPO", "-f", "F.gguf", "-t", "TOK", "--port", "1234"]
    assert ours("-i", "gguf", "--quantized-model-id", "R", "--quantized-filename", "F.gguf", "--tok-model-id", "T") \
        == ["run", "-m", "R", "-f", "F.gguf", "-t", "T"]
    assert ours("-v", "-i", "run", "-m", "M") == ["-v", "run", "-m", "M"]


def test_engine_options_before_or_after_the_subcommand():
    line = ours("--isq", "4", "--token-source", "env:HF", "--chat-template", "t.jinja", "--seed", "7",
                "--max-seqs", "8", "-i", "plain", "-m", "M")
    assert line == ["run", "-m", "M", "--isq", "4", "--token-source", "env:HF", "--chat-template", "t.jinja",
                    "--seed", "7", "--max-seqs", "8"]
    after = ours("-i", "plain", "-m", "M", "--isq", "Q4K", "--seed", "3", "--max-seqs", "2")
    args = build_parser().parse_args(after)
    assert (args.command, args.isq, args.seed, args.max_seqs) == ("run", "Q4K", 3, 2)
    assert ours("--isq", "Q4K", "serve", "-m", "M") == ["serve", "-m", "M", "--isq", "Q4K"]
    mcp = ours("--mcp-config", "mcp.json", "--port", "1234", "plain", "-m", "M")
    assert mcp == ["serve", "-m", "M", "--mcp-config", "mcp.json", "--port", "1234"]
    assert build_parser().parse_args(mcp).mcp_config == "mcp.json"
    assert ours("--mcp-port", "4321", "plain", "-m", "M") == ["serve", "-m", "M", "--mcp-port", "4321"]
    assert ours("--enable-search", "--port", "1", "plain", "-m", "M") == ["serve", "-m", "M", "--enable-search",
                                                                          "--port", "1"]
    assert ours("--pa-blk-size", "32", "--prompt-chunksize", "256", "--pa-gpu-mem", "2048", "-i", "run", "-m", "M") \
        == ["run", "-m", "M", "--block-size", "32", "--max-num-batched-tokens", "256", "--kv-cache-memory-gb", "2"]


def test_ignored_options_give_notes(tmp_path):
    new, notes = rewrite(["--no-kv-cache", "--prefix-cache-n", "4", "--no-paged-attn", "-i", "run", "-m", "M"])
    assert new == ["run", "-m", "M"] and len(notes) == 3 and "--no-kv-cache has no effect" in notes[0]
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    assert ours("-i", "plain", "-m", "M", "-t", str(tok)) == ["run", "-m", "M", "-t", str(tmp_path)]


@pytest.mark.parametrize("argv, match", [
    (["-i", "vision-plain", "-m", "M"], "vision models"),
    (["--port", "1", "diffusion-plain", "-m", "M"], "image generation"),
    (["-i", "speech", "-m", "M"], "speech"),
    (["-i", "x-lora", "-m", "M"], "X-LoRA"),
    (["-i", "--port", "1", "run", "-m", "M"], "choose one"),
    (["--bogus", "run", "-m", "M"], "unknown option"),
    (["-i", "plain", "-m", "M", "--from-uqff", "f"], "not supported"),
    (["--isq"], None),
])
def test_unmappable_lines(argv, match):
    if match is None:
        assert rewrite(argv) == (argv, [])  # no subcommand: argparse reports it
        return
    with pytest.raises(LegacyCommandError, match=match):
        rewrite(argv)


def test_real_one_shot_run_through_the_legacy_line(tmp_path_factory, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("legacy_cli"), "llama", tokenizer_dir)
    proc = subprocess.run([sys.executable, "-m", "mistralpy.cli.main", "--seed", "1", "--max-seqs", "2",
                           "--no-kv-cache", "plain", "-m", str(ckpt), "-a", "llama", "-d", "f32",
                           "-i", "hello there", "--max-tokens", "5", "--temperature", "0", "--num-kv-blocks", "16"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--no-kv-cache has no effect" in proc.stderr
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=16)
    try:
        expected = eng.chat([{"role": "user", "content": "hello there"}], max_tokens=5, temperature=0)
    finally:
        eng.shutdown()
    assert proc.stdout == expected.choices[0].message.content + "\n"
    bad = subprocess.run([sys.executable, "-m", "mistralpy.cli.main", "-i", "vision-plain", "-m", "x"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "vision models" in bad.stderr
