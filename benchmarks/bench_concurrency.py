#!/usr/bin/env python
"""Concurrency sweep: aggregate generated tok/s and per-request latency at 1, 4, 16, 32, 64 clients.

Engines, one at a time, same model file and thread count, greedy, EOS ignored:

- `engine`: mistralpy's AsyncEngine in this process, N concurrent streaming requests;
- `server`: `mistralpy serve` in a subprocess, N concurrent streaming HTTP clients (httpx) on
  /v1/completions;
- `llama.cpp`: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the same GGUF file,
  driven the same way. That server holds ONE llama context behind a lock: it runs requests one
  after another (continuous batching with `n_parallel` slots exists only in llama.cpp's C++
  `llama-server`). `--interrupt_requests False` is passed, otherwise each new request cancels the
  stream in progress;
- `llama-server`: llama.cpp's own C++ server (`--llama-server PATH`; not in the default list) with
  `-np` = the largest level: continuous batching over that many parallel slots, the honest peer for
  throughput; driven like the others, `ignore_eos` set;
- `transformers`: `generate` on one left-padded batch of the N prompts (the in-process peer: static
  batching, every request waits for the whole batch). GGUF files are dequantized to float by
  transformers.

Per level N, every client sends one request with a fresh random prompt (random vocabulary words,
cut to --prompt-len tokens: no prefix cache can hit) and asks for --gen-len tokens. Reported:
aggregate tok/s = N * gen_len / wall time from the first submit to the last token, mean / p50 /
max time to first token (TTFT) and the mean inter-token latency (ITL) of the requests. For
transformers, TTFT is the time of a 1-token batch and ITL the difference method
(T(gen_len) - T(1)) / (gen_len - 1), the same for every request of the batch.

Writes JSON (benchmarks/results/bench_concurrency.json), prints markdown tables and renders a PNG
of tok/s and TTFT against concurrency (benchmarks/plot_results.py). `--quick`: 1 and 4 clients,
short prompts and generations, a smoke run of about 2 minutes.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_engine import CpuMonitor  # same directory

ENGINES = ("engine", "server", "llama.cpp", "llama-server", "transformers")
DEFAULT_ENGINES = ("engine", "server", "llama.cpp", "transformers")
Record = tuple[float, float | None, float | None, int]  # submit, first token, last token, tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mistralpy.cli.bench import usable_cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file or HF folder (default: the built-in SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help="comma-separated, from " + ", ".join(ENGINES))
    p.add_argument("--llama-server", default=None, help="llama.cpp's C++ llama-server binary (engine llama-server)")
    p.add_argument("--levels", default="1,4,16,32,64", help="numbers of concurrent clients")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--gen-len", type=int, default=64, help="generated tokens per request")
    p.add_argument("--threads", type=int, default=usable_cpus(), help="threads of every engine")
    p.add_argument("--dtype", default="auto", help="mistralpy compute dtype (auto|bf16|f32)")
    p.add_argument("--tf-dtype", default="f32", choices=["f32", "bf16"], help="transformers dtype")
    p.add_argument("--compile", action="store_true", help="mistralpy with torch.compile'd decode steps")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --levels 1,4 --prompt-len 32 --gen-len 16 (about 2 minutes)")
    p.add_argument("--request-timeout", type=float, default=1800, help="HTTP timeout per request, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=HERE / "results" / "bench_concurrency.json")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.levels, args.prompt_len, args.gen_len = "1,4", 32, 16
    args.levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if set(args.engines) - set(ENGINES):
        p.error(f"unknown engines {sorted(set(args.engines) - set(ENGINES))}")
    if "llama-server" in args.engines and not args.llama_server:
        p.error("engine llama-server needs --llama-server PATH")
    if not args.levels or min(args.levels) < 1 or args.gen_len < 2 or args.prompt_len < 1:
        p.error("levels must be >= 1, --gen-len >= 2, --prompt-len >= 1")
    return args


# ---- prompts ----------------------------------------------------------------------------------------
class Prompts:
    """Fresh texts of random vocabulary words, cut to `length` tokens of the model's tokenizer."""

    def __init__(self, model: str, seed: int) -> None:
        from mistralpy.tokenizer.tokenizer import Tokenizer

        self.tok = Tokenizer.from_gguf(model) if model.endswith(".gguf") else Tokenizer.from_dir(model)
        words = [re.sub(r"^[\u0120\u2581]", "", t) for t in self.tok.token_texts() if t]
        self.words = [w for w in words if re.fullmatch(r"[a-z]{3,12}", w)] or [str(i) for i in range(1000)]
        self.rng = random.Random(seed)
        self.eos_ids = sorted(self.tok.eos_token_ids)

    def text(self, length: int) -> str:
        text = " ".join(self.rng.choice(self.words) for _ in range(length + 8))
        ids = self.tok.encode(text, add_special_tokens=False)[:length]
        return self.tok.decode(ids)

    def __call__(self, n: int, length: int) -> list[str]:
        return [self.text(length) for _ in range(n)]


def summarize(records: list[Record], wall: float, gen_len: int) -> dict[str, Any]:
    ttft = [f - s for s, f, _, _ in records if f is not None]
    itl = [(last - first) / (n - 1) for _, first, last, n in records if first is not None and n > 1]
    tokens = sum(r[3] for r in records)
    return {"clients": len(records), "wall_s": wall, "generated_tokens": tokens, "agg_tok_s": tokens / wall,
            "short_requests": sum(r[3] < gen_len for r in records),
            "ttft_s": {"mean": statistics.fmean(ttft), "p50": statistics.median(ttft), "max": max(ttft)},
            "itl_ms_mean": 1e3 * statistics.fmean(itl) if itl else None}


# ---- (a) in-process AsyncEngine ------------------------------------------------------------------------
def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": args.dtype, "max_seqs": max(32, max(args.levels)), "compile": args.compile}


def run_engine(args: argparse.Namespace, prompts: Prompts) -> list[dict]:
    from mistralpy import AsyncEngine, SamplingParams

    aeng = AsyncEngine(args.model, **engine_kwargs(args))
    args.mistralpy_dtype = str(aeng.engine.model_config.dtype).replace("torch.", "")
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True)

    async def one(text: str) -> Record:
        t0, first, last, n = time.perf_counter(), None, None, 0
        async for out in aeng.generate_stream(text, params):
            k = len(out.outputs[0].token_ids)  # this delta's tokens
            if k:
                last = time.perf_counter()
                first, n = first or last, n + k
        return t0, first, last, n

    async def level(texts: list[str]) -> dict:
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(t) for t in texts))
        return summarize(list(recs), time.perf_counter() - t0, args.gen_len)

    try:
        return sweep(args, prompts, lambda texts: asyncio.run(level(texts)))
    finally:
        aeng.shutdown()


# ---- (b), (c) HTTP servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An OpenAI-compatible server in a subprocess; stopped (by its pid) on exit."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> str:
        import httpx

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def http_level(url: str, payloads: list[dict], timeout: float, gen_len: int) -> dict:
    import httpx

    async def one(client: httpx.AsyncClient, payload: dict) -> Record:
        t0, first, last, chunks, usage = time.perf_counter(), None, None, 0, None
        async with client.stream("POST", url + "/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("usage"):
                    usage = obj["usage"].get("completion_tokens")
                if obj.get("choices") and obj["choices"][0].get("text"):
                    last = time.perf_counter()
                    first, chunks = first or last, chunks + 1
        # a chunk is one token, except where the detokenizer held back part of a character
        return t0, first, last, usage or chunks

    limits = httpx.Limits(max_connections=len(payloads) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(client, p) for p in payloads))
        return summarize(list(recs), time.perf_counter() - t0, gen_len)


def run_server(args: argparse.Namespace, prompts: Prompts, which: str) -> list[dict]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    log = args.output.with_name(f"{args.output.stem}_{which.replace('.', '')}_server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    if which == "server":
        cmd = [sys.executable, "-m", "mistralpy.cli.main", "serve", "-m", args.model, "--port", str(port),
               "--dtype", args.dtype, "--max-seqs", str(max(32, max(args.levels))), "--log-interval", "0"]
        cmd += ["--compile"] if args.compile else []
        extra: dict[str, Any] = {"ignore_eos": True}
    elif which == "llama-server":
        slots = max(args.levels)
        cmd = [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * (args.prompt_len + args.gen_len + 64)),
               "--no-webui"]
        extra = {"ignore_eos": True}
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(max(2048, args.prompt_len + args.gen_len + 16)), "--interrupt_requests", "False",
               "--verbose", "False"]
        extra = {"logit_bias": {str(i): -100.0 for i in prompts.eos_ids}}  # no ignore_eos there
    server = Server(cmd, port, env, log)
    try:
        model_id = server.wait_ready()

        def level(texts: list[str]) -> dict:
            payloads = [{"model": model_id, "prompt": t, "max_tokens": args.gen_len, "temperature": 0.0,
                         "stream": True, "stream_options": {"include_usage": True}, **extra} for t in texts]
            return asyncio.run(http_level(server.url, payloads, args.request_timeout, args.gen_len))

        return sweep(args, prompts, level, server.proc.pid)
    finally:
        server.stop()


# ---- (d) transformers ---------------------------------------------------------------------------------
def run_transformers(args: argparse.Namespace, prompts: Prompts) -> list[dict]:
    import torch
    import transformers

    from mistralpy.cli.bench import in_thread

    path = Path(args.model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    src = path.parent if path.suffix == ".gguf" else path
    dtype = torch.float32 if args.tf_dtype == "f32" else torch.bfloat16
    model = in_thread(lambda: transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).eval())
    pad = prompts.eos_ids[0] if prompts.eos_ids else 0

    def generate(texts: list[str], n: int) -> float:
        batch = [prompts.tok.encode(t) for t in texts]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):  # left padding: how transformers batches prompts of unequal length
            ids[i, width - len(b):], mask[i, width - len(b):] = torch.tensor(b), 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        return time.perf_counter() - t0

    def level(texts: list[str]) -> dict:
        t1 = generate(prompts(len(texts), args.prompt_len), 1)  # fresh prompts of the same length
        tn = generate(texts, args.gen_len)
        itl = (tn - t1) / (args.gen_len - 1)
        recs = [(0.0, t1, t1 + itl * (args.gen_len - 1), args.gen_len) for _ in texts]
        return summarize(recs, tn, args.gen_len) | {"note": "static batch: TTFT = 1-token batch time"}

    return in_thread(sweep, args, prompts, level)  # the model is freed with this frame


# ---- driver ---------------------------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process `pid`, threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def sweep(args: argparse.Namespace, prompts: Prompts, level, server_pid: int | None = None) -> list[dict]:
    """Warm-up, then each concurrency level with fresh prompts. `server_pid`: the engine's own
    process, whose CPU time is not "other processes" in the busy-machine check."""
    level(prompts(1, args.prompt_len))
    if not args.quick:
        level(prompts(min(4, max(args.levels)), args.prompt_len))
    out = []
    for n in args.levels:
        monitor = CpuMonitor().start()
        before = process_cpu_s(server_pid) if server_pid else None
        r = level(prompts(n, args.prompt_len))
        usage = monitor.stop()
        after = process_cpu_s(server_pid) if server_pid else None
        if before is not None and after is not None and usage.get("wall_s"):
            usage["server_cores"] = round((after - before) / usage["wall_s"], 2)
            usage["other_cores"] = round(max(0.0, usage["other_cores"] - usage["server_cores"]), 2)
        r["cpu_usage"] = usage
        print(f"  {n:>3} clients: {r['agg_tok_s']:8.1f} tok/s, TTFT mean {r['ttft_s']['mean']:.2f} s, "
              f"ITL {r['itl_ms_mean'] or 0:.1f} ms", flush=True)
        out.append(r)
    return out


def fmt(x: float | None, spec: str = ",.1f") -> str:
    return "—" if x is None else format(x, spec)


def report(res: dict) -> str:
    cfg, mach, results = res["config"], res["machine"], res["results"]
    names = list(results)
    by_level = {name: {r["clients"]: r for r in rows} for name, rows in results.items()}
    head = "| clients | " + " | ".join(names) + " |"
    sep = "|---:|" + "---:|" * len(names)
    lines = [(f"### Concurrency sweep — {Path(res['model']).name}, {cfg['prompt_len']}-token prompts, "
              f"{cfg['gen_len']} tokens each, {mach['threads']} threads"), "",
             "Aggregate generated tok/s (all clients, wall time incl. prefill):", "", head, sep]
    for n in cfg["levels"]:
        lines.append(f"| {n} | " + " | ".join(fmt(by_level[k].get(n, {}).get("agg_tok_s")) for k in names) + " |")
    lines += ["", "Mean TTFT (s) / mean inter-token latency (ms) per request:", "", head, sep]
    for n in cfg["levels"]:
        cells = []
        for k in names:
            r = by_level[k].get(n)
            cells.append("—" if r is None else f"{fmt(r['ttft_s']['mean'], '.2f')} / {fmt(r['itl_ms_mean'])}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", ("Notes: llama.cpp = llama-cpp-python's server, which serializes requests (one context behind "
                   "a lock); llama-server = llama.cpp's C++ server, continuous batching over -np slots. "
                   "transformers = one left-padded static batch per level (TTFT = 1-token batch time; "
                   "GGUF dequantized to "
                   f"{cfg['tf_dtype']}). mistralpy dtype {cfg.get('mistralpy_dtype', cfg['dtype'])}"
                   f"{', compiled' if cfg['compile'] else ''}."),
              (f"Machine: {mach['cpu']} ({mach['cpu_family_model']}), {mach['usable_cpus']}/{mach['logical_cpus']} "
               f"CPUs usable, ISA {'+'.join(mach['isa']) or 'baseline'}, {mach['memory_gb']} GB RAM, load average "
               f"at start {mach['loadavg']}; torch {mach['torch']}, mistralpy {mach['mistralpy']} "
               f"({mach['mistralpy_commit']}).")]
    busy = [f"{k}@{r['clients']}: {r['cpu_usage']['other_cores']}" for k, rows in results.items() for r in rows
            if r.get("cpu_usage", {}).get("other_cores", 0) > 0.2]
    if busy:
        lines.append("Other processes used over 0.2 cores during: " + ", ".join(busy) + " (skewed).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch: every pool uses this count
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from mistralpy.cli.bench import machine_info

    torch.set_num_threads(args.threads)
    if args.model is None:
        from mistralpy.cli.default_model import default_model_path

        args.model = default_model_path()
    machine = machine_info(args.threads)  # load average before this script loads anything
    prompts = Prompts(args.model, args.seed)
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    for name in args.engines:
        print(f"{name} ...", flush=True)
        try:
            if name == "engine":
                results[name] = run_engine(args, prompts)
            elif name in ("server", "llama.cpp", "llama-server"):
                results[name] = run_server(args, prompts, name)
            else:
                results[name] = run_transformers(args, prompts)
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"  {name} failed: {errors[name]}", flush=True)
        gc.collect()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("output",)}
    res = {"benchmark": "bench_concurrency", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
           "config": config, "machine": machine, "results": results, "errors": errors,
           "total_s": time.perf_counter() - t_start}
    table = report(res)
    print()
    print(table)
    print(f"\n(total {res['total_s']:.0f} s)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res | {"table_markdown": table}, indent=2) + "\n")
    print(f"wrote {args.output}")
    if not args.no_plot and results:
        from plot_results import plot_concurrency

        print(f"wrote {plot_concurrency(res, args.output.with_suffix('.png'))}")
    return 1 if errors and not results else 0


if __name__ == "__main__":
    sys.exit(main())
