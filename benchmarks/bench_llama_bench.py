#!/usr/bin/env python
"""mistralpy against llama.cpp's own C++ ``llama-bench`` on the same GGUF files, same threads, one run.

For each file: ``mistralpy bench`` (a subprocess: prefill ppP and batch-1 decode tgN at depth 0,
fresh random prompts, EOS ignored) and ``llama-bench -p P -n N -t T -r R -o json`` (its pp / tg
tests: prompt processing and generation from an empty context), side by side, with the ratio
ours / llama.cpp, the CPU model and the ISA variant of our C++ kernels (``MISTRALPY_CPU_ISA`` may
force one). Build llama-bench from the llama-cpp-python sdist (../shared/ASSETS.md, ~12 min on
2 cores) and pass ``--llama-bench PATH``. Writes JSON and a markdown table.

    python benchmarks/bench_llama_bench.py --llama-bench BUILD/bin/llama-bench [--gguf A.gguf --gguf B.gguf]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gguf import default_gguf  # noqa: E402


def run_ours(path: str, threads: int, prompt_len: int, gen_len: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.json"
        cmd = [sys.executable, "-m", "mistralpy.cli.main", "bench", "-m", path, "--threads", str(threads),
               "--prompt-lens", str(prompt_len), "--depths", "0", "--gen-len", str(gen_len),
               "--repeats", str(repeats), "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res = json.loads(out.read_text())
    return {"pp": res["results"]["prefill"][0]["tok_s"]["mean"], "tg": res["results"]["decode"][0]["tok_s"]["mean"],
            "pp_stdev": res["results"]["prefill"][0]["tok_s"]["stdev"],
            "tg_stdev": res["results"]["decode"][0]["tok_s"]["stdev"], "machine": res["machine"],
            "dtype": res["dtype"], "roofline_tok_s": res["roofline"]["upper_bound_tok_s"],
            "bandwidth_gb_s": res["roofline"]["bandwidth_gb_s"]}


def run_llama_bench(exe: str, path: str, threads: int, prompt_len: int, gen_len: int, repeats: int) -> dict:
    cmd = [exe, "-m", path, "-t", str(threads), "-p", str(prompt_len), "-n", str(gen_len), "-r", str(repeats),
           "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    got = {}
    for r in rows:
        key = "pp" if r["n_prompt"] > 0 else "tg"
        got[key], got[key + "_stdev"] = r["avg_ts"], r["stddev_ts"]
        got["build"] = r.get("build_commit")
        got["cpu"] = r.get("cpu_info")
        got["backend"] = r.get("backends")
    return got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-bench binary")
    p.add_argument("--gguf", action="append", help="GGUF file (repeatable; default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", type=Path, default=HERE / "results" / "bench_llama_bench.json")
    args = p.parse_args()
    files = args.gguf or [default_gguf()]
    rows = []
    for path in files:
        ours = run_ours(path, args.threads, args.prompt_len, args.gen_len, args.repeats)
        ref = run_llama_bench(args.llama_bench, path, args.threads, args.prompt_len, args.gen_len, args.repeats)
        rows.append({"file": Path(path).name, "ours": ours, "llama_bench": ref,
                     "tg_ratio": ours["tg"] / ref["tg"], "pp_ratio": ours["pp"] / ref["pp"]})
        print(f"{Path(path).name}: tg{args.gen_len} {ours['tg']:.1f} vs {ref['tg']:.1f} "
              f"({rows[-1]['tg_ratio']:.2f}x), pp{args.prompt_len} {ours['pp']:.1f} vs {ref['pp']:.1f} "
              f"({rows[-1]['pp_ratio']:.2f}x)", flush=True)
    mach = rows[0]["ours"]["machine"]
    lines = [f"### mistralpy vs llama-bench — {mach['cpu']} ({mach['cpu_family_model']}), "
             f"{'+'.join(mach['isa'])}, our kernels: {mach.get('cpu_kernels')} variant, {args.threads} threads", "",
             f"| file | decode tg{args.gen_len} ours | llama-bench | ratio | prefill pp{args.prompt_len} ours | "
             "llama-bench | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, ref = r["ours"], r["llama_bench"]
        lines.append(f"| {r['file']} | {o['tg']:.1f} | {ref['tg']:.1f} | **{r['tg_ratio']:.2f}x** | {o['pp']:.1f} | "
                     f"{ref['pp']:.1f} | {r['pp_ratio']:.2f}x |")
    table = "\n".join(lines)
    print()
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "bench_llama_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "threads": args.threads, "prompt_len": args.prompt_len,
                                       "gen_len": args.gen_len, "rows": rows, "table_markdown": table},
                                      indent=2, default=str) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
