#!/usr/bin/env python
"""Render a bench_concurrency.py results JSON as a PNG: aggregate generated tok/s and mean time to
first token against the number of concurrent clients, one line per engine.

    python benchmarks/plot_results.py benchmarks/results/bench_concurrency.json [-o OUT.png]

Needs matplotlib (`pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def plot_concurrency(res: dict[str, Any], out: Path) -> Path:
    """Two panels (tok/s, TTFT) over clients on a log2 axis; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in res["results"].items():
        rows = [r for r in levels if r.get("agg_tok_s")]
        if not rows:
            continue
        xs = [r["clients"] for r in rows]
        ax_tps.plot(xs, [r["agg_tok_s"] for r in rows], marker="o", label=name)
        ax_ttft.plot(xs, [r["ttft_s"]["mean"] for r in rows], marker="o", label=name)
    for ax, ylabel in ((ax_tps, "generated tok/s (all clients)"), (ax_ttft, "mean time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_ttft.set_yscale("log")
    cfg, mach = res["config"], res["machine"]
    fig.suptitle(f"{Path(res['model']).name}: {cfg['prompt_len']}-token prompts, {cfg['gen_len']} tokens each, "
                 f"{mach['threads']} threads, {mach['cpu']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="bench_concurrency.py JSON")
    p.add_argument("-o", "--output", type=Path, help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    res = json.loads(args.results.read_text())
    if res.get("benchmark") != "bench_concurrency":
        p.error(f"{args.results} is not a bench_concurrency.py result")
    print(f"wrote {plot_concurrency(res, args.output or args.results.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
