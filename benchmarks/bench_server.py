"""Throughput and latency of `edge-ms serve` under a bounded loopback load.

Starts the real server (a subprocess running `python -m edge_ms.cli serve`) on a free loopback port,
then C client threads each send R chat completions one after another with the official `openai`
client, and reports requests per second and latency percentiles.

    python benchmarks/bench_server.py                       # the tiny-qwen2 fixture, converted to f32
    python benchmarks/bench_server.py --model DIR --clients 4 --requests 10 --effort low --max-tokens 32 \
        --json bench_server.json
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
from openai import OpenAI

from edge_ms.atomic import write_text

try:
    import httpx2 as httpx  # what openai >= 3 is built on
except ImportError:
    import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 6 times 7? Please reason step by step."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int, queue_size: int, threads: int | None) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "edge_ms.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--queue-size",
        str(queue_size),
    ]
    if threads:
        args += ["--threads", str(threads)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the server exited: {proc.stderr.read().strip()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise click.ClickException("the server did not come up within 120 s")


def _load(
    url: str, clients: int, requests: int, args: dict
) -> tuple[list[float], list[int], list[str], float]:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        api = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
        gate.wait()
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                out = api.chat.completions.create(model="m", messages=QUESTION, seed=c * 1000 + i, **args)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, tokens, errors, time.perf_counter() - t0


@click.command()
@click.option(
    "--model", default=None, help="Model directory / store name / GGUF (default: the tiny-qwen2 fixture)."
)
@click.option("--clients", type=int, default=4, show_default=True, help="Concurrent clients.")
@click.option(
    "--requests", type=int, default=10, show_default=True, help="Requests per client, one after another."
)
@click.option("--effort", default="low", show_default=True, help="reasoning_effort of every request.")
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option(
    "--threads", type=int, default=None, help="Server CPU threads (default: the server's own default)."
)
@click.option("--json", "json_out", default=None, help="Also write the figures to this JSON file.")
def main(model, clients, requests, effort, max_tokens, threads, json_out) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from edge_ms.convert import convert

            model = str(
                convert(
                    ROOT / "tests" / "fixtures" / "tiny-qwen2", Path(tmp) / "tiny-qwen2-f32", quant="f32"
                ).gguf_path.parent
            )
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        load_before = os.getloadavg()[0]
        proc = _start_server(model, port, queue_size=max(clients, 1), threads=threads)
        try:
            args = dict(reasoning_effort=effort, max_tokens=max_tokens)
            _load(url, 1, 1, args)  # warm-up: builds the llama.cpp context once
            lat, toks, errors, wall = _load(url, clients, requests, args)
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    ms = np.array(lat) * 1000 if lat else np.zeros(1)
    figures = {
        "model": model if not model.startswith(tempfile.gettempdir()) else "tests/fixtures/tiny-qwen2 (f32)",
        "clients": clients,
        "requests_per_client": requests,
        "reasoning_effort": effort,
        "max_tokens": max_tokens,
        "server_threads": threads,
        "ok": len(lat),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(lat) / wall, 3),
        "completion_tokens_per_s": round(sum(toks) / wall, 1),
        "latency_ms": {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)}
        | {"mean": round(float(ms.mean()), 1), "max": round(float(ms.max()), 1)},
        "server_cancelled": health["cancelled"],
        "server_rejected": health["rejected"],
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_before": round(load_before, 2),
            "python": platform.python_version(),
        },
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    rows = [
        ("requests ok / errors", f"{figures['ok']} / {figures['errors']}"),
        ("wall", f"{wall:.2f} s"),
        ("requests/s", f"{figures['requests_per_s']:.2f}"),
        ("completion tokens/s (all trajectories)", f"{figures['completion_tokens_per_s']:.0f}"),
    ]
    rows += [(f"latency {k}", f"{v:.1f} ms") for k, v in figures["latency_ms"].items()]
    click.echo(
        f"{clients} clients x {requests} requests, effort {effort}, max_tokens {max_tokens}, model {figures['model']}"
    )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v:>12}")
    if json_out:
        write_text(json_out, json.dumps(figures, indent=2) + "\n")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
