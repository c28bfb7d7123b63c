"""`mistralpy bench` end to end on a tiny random checkpoint: the JSON it writes and the table it prints.
Timings are never asserted (the machine is shared); only structure and positivity."""
from __future__ import annotations

import json
import math

import pytest
from fixtures_models import build_checkpoint

from mistralpy.cli.main import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("bench"), "llama", tokenizer_dir)


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_writes_prefill_decode_and_roofline(ckpt, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "-m", str(ckpt), "--dtype", "f32", "--num-kv-blocks", "16", "--prompt-lens", "8,20",
               "--depths", "0,12", "--gen-len", "4", "--repeats", "2", "--threads", "1",
               "--bandwidth-gib", "0.01", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["prompt_len"] for r in res["results"]["prefill"]] == [8, 20]
    assert [r["depth"] for r in res["results"]["decode"]] == [0, 12]
    for r in res["results"]["prefill"]:
        assert len(r["ttft_runs_s"]) == 2 and _positive(r["tok_s"]["mean"]) and r["tok_s"]["stdev"] >= 0
    for r in res["results"]["decode"]:
        assert r["gen_len"] == 4 and len(r["one_token_runs_s"]) == len(r["gen_len_runs_s"]) == 2
        assert _positive(r["tok_s"]["mean"]) and _positive(r["tok_s_of_means"])
    roof = res["roofline"]
    assert roof["bandwidth_source"].startswith("measured") and _positive(roof["bandwidth_gb_s"])
    # f32 llama fixture with an untied head: every weight but the embedding table, 4 bytes each
    import torch
    from safetensors.torch import load_file

    sd = {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(f).items()}
    expected = sum(v.numel() * 4 for k, v in sd.items() if "embed_tokens" not in k)
    assert "lm_head.weight" in sd and roof["bytes_per_token"] == expected
    assert len(roof["decode_pct"]) == 2 and all(_positive(p) for p in roof["decode_pct"])
    assert res["machine"]["threads"] == 1 and res["machine"]["usable_cpus"] >= 1 and res["dtype"] == "float32"
    # start-up: load time and peak memory, which holds at least the loaded weights
    assert res["startup"]["load_s"] > 0 and res["startup"]["peak_rss_mb"] * 2**20 > res["roofline"]["bytes_per_token"]
    assert torch.get_num_threads() == 1
    printed = capsys.readouterr().out
    assert "| prefill pp20 |" in printed and "| decode tg4 @ depth 12 |" in printed
    assert "of the bandwidth limit" in printed and res["table_markdown"] in printed


def test_bench_given_bandwidth_and_bad_options(ckpt, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "-m", str(ckpt), "--dtype", "f32", "--num-kv-blocks", "16", "--prompt-lens", "",
               "--depths", "4", "--gen-len", "3", "--repeats", "1", "--warmup", "0", "--bandwidth-gbs", "10",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["results"]["prefill"] == [] and res["roofline"]["bandwidth_gb_s"] == 10.0
    assert res["roofline"]["bandwidth_source"] == "given"
    assert res["results"]["decode"][0]["tok_s"]["stdev"] == 0.0
    assert main(["bench", "-m", str(ckpt), "--gen-len", "1"]) == 2
    assert "--gen-len" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "-m", str(ckpt), "--prompt-lens", "a,b"])


def test_bench_concurrency_engine_sweep_json_table_and_plot(ckpt, tmp_path, capsys):
    """benchmarks/bench_concurrency.py end to end with the in-process engine only (the servers and
    transformers need seconds each to start): structure of the JSON, the tables, the PNG."""
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_concurrency
    finally:
        sys.path.remove(str(bench_dir))
    out = tmp_path / "conc.json"
    rc = bench_concurrency.main(["--model", str(ckpt), "--engines", "engine", "--levels", "1,3", "--prompt-len", "6",
                                 "--gen-len", "3", "--threads", "1", "--dtype", "f32", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "bench_concurrency" and res["errors"] == {}
    rows = res["results"]["engine"]
    assert [r["clients"] for r in rows] == [1, 3]
    for r in rows:
        assert r["generated_tokens"] == 3 * r["clients"] and r["short_requests"] == 0
        assert _positive(r["agg_tok_s"]) and _positive(r["ttft_s"]["mean"]) and _positive(r["itl_ms_mean"])
        assert r["ttft_s"]["max"] >= r["ttft_s"]["p50"] > 0
    assert res["config"]["mistralpy_dtype"] == "float32"
    png = out.with_suffix(".png")
    if png.exists():  # matplotlib is in the `bench` extra, not the test one
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| clients | engine |" in printed and res["table_markdown"] in printed
