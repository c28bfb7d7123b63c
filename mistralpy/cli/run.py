"""`mistralpy run`: one-shot generation (-i) or an interactive chat with slash commands."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mistralpy.cli.main import engine_kwargs, sampling_kwargs
from mistralpy.errors import InvalidRequestError

HELP = """commands:
  /help              this help
  /exit              quit (also Ctrl-D)
  /clear             forget the conversation
  /system TEXT       set the system prompt (and clear)
  /temperature X     set temperature (0 = greedy)
  /topk N            set top-k (0 = off)
  /topp P            set top-p"""


def _stream_text(chunks) -> str:
    text = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") or ""
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


def _raw_stream(engine, prompt: str, sampling: dict[str, Any]) -> str:
    from mistralpy.engine.llm_engine import sampling_from_kwargs

    text = []
    for out in engine.generate_stream(prompt, sampling_from_kwargs(sampling)):
        piece = out.outputs[0].text
        text.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def split_media(line: str) -> tuple[str, list[str]]:
    """Image paths (existing files) and http(s) image URLs typed in a message, as mistral.rs's
    interactive mode finds them: (the text without them, the images in order)."""
    words, images = [], []
    for word in line.split():
        bare = word.strip("'\"")
        low = bare.lower().split("?")[0]
        is_url = low.startswith(("http://", "https://")) and low.endswith(_IMAGE_SUFFIXES)
        if is_url or (low.endswith(_IMAGE_SUFFIXES) and os.path.isfile(os.path.expanduser(bare))):
            images.append(bare if is_url else os.path.expanduser(bare))
        else:
            words.append(word)
    return " ".join(words), images


def user_content(text: str, images: list[str]) -> str | list[dict[str, Any]]:
    """A user message's content: the text, with image parts after it when there are images."""
    if not images:
        return text
    return [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": i}} for i in images]


def _system(args_system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": args_system}] if args_system else []


def run_command(args: argparse.Namespace) -> int:
    from mistralpy.engine.llm_engine import Engine

    from mistralpy.cli.progress import LoadProgress

    engine = Engine(args.model, **engine_kwargs(args), progress=LoadProgress())
    sampling = sampling_kwargs(args)
    try:
        if args.input is not None:
            if args.raw:
                _raw_stream(engine, args.input, sampling)
            else:
                messages = _system(args.system) + [{"role": "user", "content": user_content(args.input, args.image)}]
                _stream_text(engine.chat(messages, stream=True, **sampling))
            return 0
        return _interactive(engine, args, sampling)
    finally:
        engine.shutdown()


def _interactive(engine, args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    system = args.system
    history = _system(system)
    print(f"mistralpy: chatting with {args.model}. /help for commands, /exit to quit.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line[1:].partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("exit", "quit"):
                    return 0
                if cmd == "help":
                    print(HELP)
                elif cmd == "clear":
                    history = _system(system)
                    print("(conversation cleared)")
                elif cmd == "system":
                    system = arg or None
                    history = _system(system)
                    print("(system prompt set)")
                elif cmd == "temperature":
                    sampling["temperature"] = float(arg)
                elif cmd == "topk":
                    sampling["top_k"] = int(arg)
                elif cmd == "topp":
                    sampling["top_p"] = float(arg)
                else:
                    print(f"unknown command /{cmd}; /help lists them")
            except ValueError:
                print(f"/{cmd} needs a number")
            continue
        try:
            if args.raw:
                _raw_stream(engine, line, sampling)
                continue
            text, images = split_media(line) if engine.media is not None else (line, [])
            history.append({"role": "user", "content": user_content(text, images)})
            reply = _stream_text(engine.chat(history, stream=True, **sampling))
            history.append({"role": "assistant", "content": reply})
        except InvalidRequestError as exc:
            print(f"error: {exc}")
            if history and history[-1]["role"] == "user":
                history.pop()
