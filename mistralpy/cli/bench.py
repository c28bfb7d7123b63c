"""`mistralpy bench`: single-request prefill and decode speed of one model, with a roofline.

Like mistral.rs's `mistralrs-bench` / llama.cpp's `llama-bench`: random token-id prompts (fresh for
every run, so the prefix cache never hits), greedy, EOS ignored, one request at a time.

- prefill tok/s at each `--prompt-lens` L: L / time to first token (a max_tokens=1 request);
- decode tok/s at each `--depths` D (D tokens of context already in the KV cache): by the difference
  of two runs on fresh D-token prompts, (gen_len - 1) / (T(gen_len) - T(1)). Both pay the same
  prefill and per-request overhead, so the difference is the gen_len - 1 decode steps alone;
- roofline: bytes of weights read per decoded token (the model as loaded: quantized sizes for GGUF
  and ISQ) / the machine's read bandwidth (measured here, or `--bandwidth-gbs`) = the upper bound
  of batch-1 decode on this machine; each decode rate is reported as a % of it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("lengths must be >= 0")
    return values


def add_bench_args(p: argparse.ArgumentParser) -> None:
    from mistralpy.cli.main import add_model_args

    add_model_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--prompt-lens", type=_int_list, default=[128, 512],
                   help="prefill: prompt lengths in tokens, comma-separated (default: 128,512; empty: skip)")
    b.add_argument("--depths", type=_int_list, default=[0, 512],
                   help="decode: context depths in tokens already in the KV cache before decoding, "
                        "comma-separated; 0 decodes after a 1-token prompt (default: 0,512; empty: skip)")
    b.add_argument("--gen-len", type=int, default=64, help="tokens decoded per decode run (default: 64)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (default: 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default: 1)")
    b.add_argument("--threads", type=int,
                   help="torch/OpenMP threads (default: OMP_NUM_THREADS, else every CPU)")
    b.add_argument("--bandwidth-gbs", type=float,
                   help="memory read bandwidth in GB/s for the roofline (default: measured in-process)")
    b.add_argument("--bandwidth-gib", type=float, default=1.0,
                   help="size of the tensor summed to measure the bandwidth, GiB (default: 1)")
    b.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    b.add_argument("--json", type=Path, metavar="OUT", help="write every number (and raw run times) to this file")


# ---- machine ------------------------------------------------------------------------------------
def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, ISA flags, memory, load average and versions: what a result must be read with."""
    import torch

    cpu, flags, family, model = platform.processor() or "unknown", [], None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name":
                cpu = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and model is None:
                model = value
            elif key == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    try:
        loadavg = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        loadavg = None
    import mistralpy
    from mistralpy.kernels import cpu as cpu_ext

    info = {
        "cpu": cpu, "cpu_family_model": f"{family}/{model}", "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(), "threads": threads or torch.get_num_threads(),
        "isa": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags],
        "cpu_kernels": cpu_ext.loaded_variant() or "unavailable", "memory_gb": mem_gb, "loadavg": loadavg,
        "python": platform.python_version(),
        "torch": torch.__version__, "mistralpy": mistralpy.__version__, "mistralpy_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mistralpy"], cwd=repo, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def measure_bandwidth(gib: float = 1.0, device: str = "cpu") -> float:
    """Read bandwidth in GB/s: best of 5 `sum`s over a float32 tensor of `gib` GiB (far bigger than
    any cache), on the calling thread's torch threads."""
    import torch

    x = torch.ones(max(1, int(gib * (1 << 30)) // 4), dtype=torch.float32, device=device)
    x.sum()  # first touch
    best = float("inf")
    for _ in range(5):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    nbytes = x.numel() * 4
    del x
    return nbytes / best / 1e9


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a short-lived thread: its OpenMP pool goes with it. A main thread that owns a
    pool makes libgomp throttle the engine thread's pool (see mistralpy/engine/loop.py)."""
    out: list = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            err.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux: VmHWM; else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights read per decoded token: everything held (`weight_bytes`: quantized sizes
    included) less an embedding table whose storage the LM head does not share (a lookup reads one
    row). Every expert of a MoE model is counted: its bound is a dense upper bound."""
    from mistralpy.layers.embedding import LMHead, VocabEmbedding
    from mistralpy.loading.model_loader import weight_bytes

    total = weight_bytes(model)
    head_storage = {id(m.weight) for m in model.modules() if isinstance(m, LMHead) and m.weight is not None}
    for m in model.modules():
        if not isinstance(m, VocabEmbedding):
            continue
        if m.weight is not None and id(m.weight) not in head_storage:
            total -= m.weight.numel() * m.weight.element_size()
        elif m.weight is None and getattr(m, "qweight", None) is not None:
            total -= m.qweight.raw.numel()  # a tied quantized head multiplies with its own kernel
    return total


# ---- runs -----------------------------------------------------------------------------------------
class Bench:
    """Times single requests on one Engine with fresh random prompts."""

    def __init__(self, engine: Any, seed: int) -> None:
        from mistralpy import SamplingParams

        self.engine, self.SamplingParams = engine, SamplingParams
        self.rng = random.Random(seed)
        vocab = engine.model_config.vocab_size
        try:  # random checkpoints may have a smaller tokenizer than the model's vocab
            vocab = min(vocab, engine.tokenizer.vocab_size)
        except (AttributeError, TypeError):
            pass
        self.low, self.high = min(10, vocab - 1), vocab

    def prompt(self, length: int) -> list[int]:
        return [self.rng.randrange(self.low, self.high) for _ in range(max(1, length))]

    def timed(self, prompt_len: int, max_tokens: int) -> float:
        params = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ids = self.prompt(prompt_len)
        t0 = time.perf_counter()
        out = self.engine.generate(ids, params)
        dt = time.perf_counter() - t0
        got = len(out[0].outputs[0].token_ids)
        if got != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {got}")
        return dt


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def run_bench(bench: Bench, args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every prefill and decode measurement; raw run times are kept."""
    for _ in range(args.warmup):  # allocator, thread pools, first-call paths (and the compile, with --compile)
        for n in sorted(set(args.prompt_lens) | set(args.depths)):
            bench.timed(n, 2)
        bench.timed(min(args.depths or [0]), args.gen_len)
    prefill = []
    for n in args.prompt_lens:
        runs = [bench.timed(n, 1) for _ in range(args.repeats)]
        rates = [max(1, n) / t for t in runs]
        prefill.append({"prompt_len": n, "tok_s": _stats(rates), "ttft_runs_s": runs})
        log(f"  prefill pp{n}: {statistics.fmean(rates):.1f} tok/s")
    decode = []
    for d in args.depths:
        t1, tn = [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both alike
            t1.append(bench.timed(d, 1))
            tn.append(bench.timed(d, args.gen_len))
        rates = [(args.gen_len - 1) / max(b - a, 1e-9) for a, b in zip(t1, tn)]
        decode.append({"depth": d, "gen_len": args.gen_len, "tok_s": _stats(rates),
                       "tok_s_of_means": (args.gen_len - 1) / max(statistics.fmean(tn) - statistics.fmean(t1), 1e-9),
                       "one_token_runs_s": t1, "gen_len_runs_s": tn})
        log(f"  decode tg{args.gen_len} @ depth {d}: {statistics.fmean(rates):.1f} tok/s")
    return {"prefill": prefill, "decode": decode}


def format_table(res: dict[str, Any]) -> str:
    cfg, mach, roof = res["config"], res["machine"], res["roofline"]
    title = f"### mistralpy bench — {Path(res['model']).name}"
    if cfg.get("isq"):
        title += f", ISQ {cfg['isq']}"
    title += f", dtype {res['dtype']}, {mach['threads']} threads" + (", compiled" if cfg.get("compile") else "")
    lines = [title, "", "| test | tok/s (mean ± stdev) | ms/token | % of roofline |", "|---|---:|---:|---:|"]
    for r in res["results"]["prefill"]:
        s = r["tok_s"]
        lines.append(f"| prefill pp{r['prompt_len']} | {s['mean']:,.1f} ± {s['stdev']:,.1f} | "
                     f"{1e3 / s['mean']:.2f} | |")
    for r in res["results"]["decode"]:
        s = r["tok_s"]
        pct = 100 * s["mean"] / roof["upper_bound_tok_s"]
        lines.append(f"| decode tg{r['gen_len']} @ depth {r['depth']} | {s['mean']:,.1f} ± {s['stdev']:,.1f} | "
                     f"{1e3 / s['mean']:.2f} | {pct:.0f}% |")
    lines += ["", (f"Roofline: {roof['bytes_per_token'] / 1e6:,.1f} MB of weights read per decoded token / "
                   f"{roof['bandwidth_gb_s']:.1f} GB/s ({roof['bandwidth_source']}) = "
                   f"{roof['upper_bound_tok_s']:,.0f} tok/s upper bound for batch-1 decode (KV-cache reads not "
                   "counted)" + (f"; depth {res['results']['decode'][0]['depth']} decode reaches "
                                 f"{roof['decode_pct'][0]:.0f}% of the bandwidth limit." if roof['decode_pct'] else "."))]
    if "startup" in res:
        st = res["startup"]
        lines.append(f"Start-up: model loaded in {st['load_s']:.1f} s; peak resident memory after loading "
                     f"{st['peak_rss_mb']:,.0f} MB.")
    lines.append(f"Machine: {mach['cpu']} ({mach['cpu_family_model']}), {mach['usable_cpus']}/{mach['logical_cpus']} "
                 f"CPUs usable, ISA {'+'.join(mach['isa']) or 'baseline'} (C++ kernels: {mach.get('cpu_kernels')} "
                 f"variant), {mach['memory_gb']} GB RAM, load average "
                 f"{mach['loadavg']}; torch {mach['torch']}, mistralpy {mach['mistralpy']} ({mach['mistralpy_commit']}).")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    from mistralpy.errors import InvalidRequestError

    if args.repeats < 1 or args.gen_len < 2 or args.warmup < 0:
        raise InvalidRequestError("--repeats must be >= 1, --gen-len >= 2 (decode is measured against a "
                                  "1-token run) and --warmup >= 0")
    if not args.prompt_lens and not args.depths:
        raise InvalidRequestError("nothing to measure: give --prompt-lens and/or --depths")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidRequestError("--threads must be >= 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the model runner keeps it
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # global: the engine thread's pool follows it
    from mistralpy import Engine
    from mistralpy.cli.main import engine_kwargs

    t_start = time.perf_counter()
    t0 = time.perf_counter()
    engine = Engine(args.model, **engine_kwargs(args))
    startup = {"load_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}  # before the bandwidth buffer
    print(f"loaded {args.model} in {startup['load_s']:.1f} s (peak RSS {startup['peak_rss_mb']:,.0f} MB)",
          flush=True)
    if args.bandwidth_gbs is None:
        # the memory the weights live in: the GPU's when the engine runs there
        device = "cuda" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) \
            else "cpu"
        bandwidth, source = in_thread(measure_bandwidth, args.bandwidth_gib, device), f"measured on {device}"
    else:
        bandwidth, source = args.bandwidth_gbs, "given"
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s ({source})", flush=True)
    try:
        model = engine.core.runner.model
        nbytes = decode_weight_bytes(model)
        n_params = sum(p.numel() for p in model.parameters())
        dtype = str(engine.model_config.dtype).replace("torch.", "")
        results = run_bench(Bench(engine, args.bench_seed), args)
    finally:
        engine.shutdown()
    upper = bandwidth * 1e9 / nbytes
    roofline = {"bytes_per_token": nbytes, "bandwidth_gb_s": bandwidth, "bandwidth_source": source,
                "upper_bound_tok_s": upper,
                "decode_pct": [100 * r["tok_s"]["mean"] / upper for r in results["decode"]],
                "note": "weights only (quantized sizes as loaded; the embedding counted as one row unless the "
                        "LM head shares it); KV-cache reads at depth D are not counted"}
    config = {k: v for k, v in vars(args).items() if k not in ("json", "command", "verbose")}
    res = {"benchmark": "mistralpy_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
           "dtype": dtype, "params": n_params, "config": config, "machine": machine_info(args.threads),
           "roofline": roofline, "startup": startup, "results": results, "total_s": time.perf_counter() - t_start}
    table = format_table(res)
    print()
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res | {"table_markdown": table}, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0
