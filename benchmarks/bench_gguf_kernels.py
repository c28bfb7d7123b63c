"""Speed of the GGUF matmul kernels (mistralpy/quant/gguf/kernels.py) on CPU.

Two tables:
1. Per block type, one 1536x576 weight (and 576x1536 for 32-block types; K-quants use 1536x512):
   ms per call and effective GB/s of the bytes the kernel holds, for M = 1, 16, 256.
2. A SmolLM2-135M-shaped token (30 layers of q/k/v/o/gate/up/down, all Q4_1, plus a Q8_0 49152x576
   head) at M = 1: ms for all matmuls, beside torch's int4 plane kernels (what bf16 used before the
   C++ extension) and a oneDNN-prepacked bf16 pass over the same shapes, alternating in one process.

Run: python benchmarks/bench_gguf_kernels.py [--dtype bf16|f32] [--types Q4_1,Q8_0] [--quick]
``--int4`` runs table 1 on torch's int4 plane kernels instead of the C++ extension (A/B).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mistralpy.layers.matmul import linear, prepack  # noqa: E402
from mistralpy.quant.gguf import kernels_cpu as gguf_kernels_cpu  # noqa: E402
from mistralpy.quant.gguf.dequant import BLOCK_SIZES  # noqa: E402
from mistralpy.quant.gguf.kernels import Int4PlaneKernel, make_gguf_kernel  # noqa: E402

log = logging.getLogger("bench_gguf_kernels")

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS,
         Q.F16, Q.BF16]
# Offsets of the f16 scale fields per block (finite random scales).
_F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
               Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0]}


def random_raw(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    bs, ts = BLOCK_SIZES[qtype]
    if qtype in (Q.F16, Q.BF16, Q.F32):
        dt = {Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.F32: torch.float32}[qtype]
        return torch.randn(rows, cols).to(dt).view(torch.uint8).reshape(rows, -1)
    n = rows * cols // bs
    raw = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def timeit(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    """Seconds per call: the best of `repeats` short runs (the machine is shared; the best run is
    the one least disturbed by other processes)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        iters, t0 = 0, time.perf_counter()
        while (time.perf_counter() - t0) < min_time / repeats or iters < 2:
            fn()
            iters += 1
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def per_type(dtype: torch.dtype, types: list[Q], rows_list: list[int], quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    print("\n| type | N x K | held MB | " + " | ".join(f"M={m} ms (GB/s)" for m in rows_list) + " |")
    print("|---|---|---|" + "---|" * len(rows_list))
    for qtype in types:
        k_in = 512 if BLOCK_SIZES[qtype][0] == 256 else 576
        shapes = [(1536, k_in)] if quick else [(1536, k_in), (k_in, 1536 if k_in == 576 else 1536)]
        for n, kk in shapes:
            if kk % BLOCK_SIZES[qtype][0]:
                continue
            kern = make_gguf_kernel(random_raw(qtype, n, kk, rng), qtype, n, kk, dtype=dtype,
                                    device=torch.device("cpu"))
            cells = []
            for m in rows_list:
                x = torch.randn(m, kk).to(dtype)
                t = timeit(lambda: kern(x))
                cells.append(f"{t * 1e3:.3f} ({kern.nbytes() / t / 1e9:.1f})")
                results.append({"type": qtype.name, "n": n, "k": kk, "m": m, "ms": t * 1e3,
                                "gb_s": kern.nbytes() / t / 1e9, "bytes_held": kern.nbytes()})
            print(f"| {qtype.name} | {n}x{kk} | {kern.nbytes() / 1e6:.2f} | " + " | ".join(cells) + " |")
    return results


SMOL = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def smollm2_token(dtype: torch.dtype, fused: bool) -> dict:
    """All matmuls of one SmolLM2-135M decode step (M = 1)."""
    rng = np.random.default_rng(1)
    layer = [(960, 576), (576, 576), (3072, 576), (576, 1536)] if fused else SMOL
    # 30 distinct copies of each weight, as in a real model: a repeated one would be read from cache.
    kerns = [make_gguf_kernel(random_raw(Q.Q4_1, n, k, rng), Q.Q4_1, n, k, dtype=dtype, device=torch.device("cpu"))
             for _ in range(30) for n, k in layer]
    head_raw = random_raw(Q.Q8_0, 49152, 576, rng)
    head = make_gguf_kernel(head_raw, Q.Q8_0, 49152, 576, dtype=dtype, device=torch.device("cpu"))
    rng = np.random.default_rng(1)
    planes = [Int4PlaneKernel.from_gguf(random_raw(Q.Q4_1, n, k, rng), Q.Q4_1, n, k, dtype)
              for _ in range(30) for n, k in layer]
    planes_head = Int4PlaneKernel.from_gguf(head_raw, Q.Q8_0, 49152, 576, dtype)
    dense = [prepack(torch.randn(n, k).to(dtype)) for _ in range(30) for n, k in layer]
    dense_head = prepack(torch.randn(49152, 576).to(dtype))
    xs = {k: torch.randn(1, k).to(dtype) for k in (576, 1536)}

    def run_q() -> None:
        for kern in kerns:
            kern(xs[kern.in_features])

    def run_p() -> None:
        for kern in planes:
            kern(xs[kern.in_features])

    def run_d() -> None:
        for w, (n, k) in zip(dense, layer * 30):
            linear(xs[k], w)

    t_layers, t_head = timeit(run_q, 1.0, 10), timeit(lambda: head(xs[576]), 0.5, 10)
    p_layers, p_head = timeit(run_p, 1.0, 10), timeit(lambda: planes_head(xs[576]), 0.5, 10)
    d_layers, d_head = timeit(run_d, 1.0, 10), timeit(lambda: linear(xs[576], dense_head), 0.5, 10)
    # Second round, reversed order: the machine is shared, keep the best of each.
    p_layers, p_head = min(p_layers, timeit(run_p, 1.0, 10)), min(p_head, timeit(lambda: planes_head(xs[576]), 0.5, 10))
    t_layers, t_head = min(t_layers, timeit(run_q, 1.0, 10)), min(t_head, timeit(lambda: head(xs[576]), 0.5, 10))
    held = sum(k.nbytes() for k in kerns) + head.nbytes()
    print(f"\nSmolLM2-135M token, M=1, {dtype}, {'fused qkv/gate-up' if fused else 'separate'} projections:")
    print("| path | 30 layers ms | head ms | total ms | MB held |\n|---|---|---|---|---|")
    print(f"| GGUF kernels (Q4_1 + Q8_0 head; {type(head).__name__}) | {t_layers * 1e3:.2f} | "
          f"{t_head * 1e3:.2f} | {(t_layers + t_head) * 1e3:.2f} | {held / 1e6:.1f} |")
    p_held = sum(k.nbytes() for k in planes) + planes_head.nbytes()
    print(f"| torch int4 planes (Int4PlaneKernel) | {p_layers * 1e3:.2f} | {p_head * 1e3:.2f} | "
          f"{(p_layers + p_head) * 1e3:.2f} | {p_held / 1e6:.1f} |")
    print(f"| {dtype} oneDNN prepacked | {d_layers * 1e3:.2f} | {d_head * 1e3:.2f} | "
          f"{(d_layers + d_head) * 1e3:.2f} | {(sum(n * k for n, k in layer) * 30 + 49152 * 576) * 2 / 1e6:.1f} |")
    return {"fused": fused, "kernel": type(head).__name__, "gguf_layers_ms": t_layers * 1e3,
            "gguf_head_ms": t_head * 1e3, "int4_layers_ms": p_layers * 1e3, "int4_head_ms": p_head * 1e3,
            "dense_layers_ms": d_layers * 1e3, "dense_head_ms": d_head * 1e3, "gguf_bytes_held": held}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--types", default="", help="comma-separated GGUF type names (default: all)")
    ap.add_argument("--rows", default="1,16,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one shape per type")
    ap.add_argument("--skip-token", action="store_true")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--int4", action="store_true", help="table 1 on torch's int4 kernels, not the C++ extension")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    if args.int4:
        gguf_kernels_cpu._state.update(ok=False, fast=False)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    types = [Q[t] for t in args.types.split(",")] if args.types else TYPES
    out = {"dtype": args.dtype, "threads": args.threads,
           "per_type": per_type(dtype, types, [int(r) for r in args.rows.split(",")], args.quick)}
    if not args.skip_token:
        out["smollm2_token"] = [smollm2_token(dtype, fused=False), smollm2_token(dtype, fused=True)]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
