"""`mistralpy serve` as a real process: CLI flags, startup, one request, the throughput log line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
from fixtures_models import build_checkpoint


def test_serve_command(tmp_path, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path / "ckpt", "llama", tokenizer_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "mistralpy.cli.main", "serve", "-m", str(ckpt), "--port", str(port), "--dtype",
             "f32", "--num-kv-blocks", "64", "--max-model-len", "256", "--served-model-name", "tiny",
             "--log-interval", "0.3"],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=64, extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 64
        time.sleep(0.8)  # one throughput interval after the busy period
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log = log_path.read_text()
    assert "throughput:" in log and "generation" in log, log
