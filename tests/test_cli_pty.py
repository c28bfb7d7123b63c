"""`mistralpy run`'s interactive chat in a pseudo-terminal (pexpect): what a user at a terminal sees."""
from __future__ import annotations

import os
import sys

import pytest

from fixtures_models import build_checkpoint
from mistralpy import Engine

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("cli_pty"), "qwen3", tokenizer_dir, head_dim=32)


def _answers(ckpt, conversations: list[list[dict]]) -> list[str]:
    eng = Engine(str(ckpt), dtype="f32", num_kv_blocks=16)
    try:
        return [eng.chat(msgs, max_tokens=6, temperature=0).choices[0].message.content for msgs in conversations]
    finally:
        eng.shutdown()


def test_interactive_chat_in_a_terminal(ckpt):
    system = {"role": "system", "content": "be brief"}
    first = [system, {"role": "user", "content": "hello there"}]
    second = [system, {"role": "user", "content": "what now"}]  # after /clear: the system prompt stays
    answers = _answers(ckpt, [first, second])
    assert all(answers), answers

    child = pexpect.spawn(sys.executable, ["-m", "mistralpy.cli.main", "run", "-m", str(ckpt), "--dtype", "f32",
                                           "--temperature", "0", "--max-tokens", "6"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, encoding="utf-8", timeout=120,
                          dimensions=(24, 200))
    try:
        child.expect_exact("/help for commands, /exit to quit.")
        child.expect_exact("> ")

        def send(line: str) -> None:
            child.sendline(line)
            child.expect_exact(line + "\r\n")  # the terminal's echo

        def answer(text: str) -> None:  # streamed, then a newline and the next prompt
            child.expect_exact(text.replace("\n", "\r\n") + "\r\n> ")

        send("/temperature 0")
        child.expect_exact("> ")
        send("/system be brief")
        child.expect_exact("(system prompt set)\r\n> ")
        send("hello there")
        answer(answers[0])
        send("/clear")
        child.expect_exact("(conversation cleared)\r\n> ")
        send("/help")
        child.expect_exact("/temperature X")
        child.expect_exact("> ")
        send("what now")
        answer(answers[1])
        send("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None
