"""Serving load test: N concurrent clients x M streamed chat completions each against a live server on
127.0.0.1, for each N given. Reports requests/s, generated tokens/s, p50/p95 time to first token and
latency, the tokens/s gain over one client, and (for a server this script started) its peak memory.

    python benchmarks/serve_load.py --model DIR [--clients 1,4,16] [--requests 8] [--max-tokens 32] [--image PNG]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-name NAME

Every request asks for a greedy caption of the same picture, so each client count does the same work
per request; the server decodes concurrent requests in one batch. One request before the runs warms up.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw


def picture_url(path: Path | None = None) -> str:
    if path is not None:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((16, 16, 80, 80), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(url: str, model: str, image_url: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, latency, completion tokens) of one streamed request."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    return (latency if first is None else first), latency, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(url: str, model: str, image_url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results, errors = [], []

    def client():
        for _ in range(requests):
            try:
                results.append(one_request(url, model, image_url, max_tokens))
            except OSError as err:
                errors.append(str(err))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    first, latency, tokens = zip(*results) if results else ((0.0,), (0.0,), (0,))
    return {"clients": clients, "requests": len(results), "errors": len(errors), "seconds": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(sum(tokens) / wall, 2),
            "ttft_p50_s": round(statistics.median(first), 4), "ttft_p95_s": round(percentile(first, 0.95), 4),
            "latency_p50_s": round(statistics.median(latency), 4),
            "latency_p95_s": round(percentile(latency, 0.95), 4)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moevlm", "serve", "--model", str(model_dir), "--port",
                                str(port), "--max-batch", str(max_batch)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 300 s")


def peak_memory_mib(pid: int) -> float | None:
    """The process's peak resident memory (Linux), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder: start `moevlm serve` on it")
    parser.add_argument("--url", help="an already running server instead")
    parser.add_argument("--model-name", help="the model's name in the API (default: the --model folder's name)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image", type=Path, help="the picture every request asks about (default: a red square)")
    parser.add_argument("--max-batch", type=int, default=16, help="for a server this script starts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.url is None):
        parser.error("give --model or --url")
    name = args.model_name or (args.model.resolve().name if args.model else None)
    if name is None:
        parser.error("--url needs --model-name")
    process, url = start_server(args.model, args.max_batch) if args.model else (None, args.url.rstrip("/"))
    try:
        image_url = picture_url(args.image)
        one_request(url, name, image_url, args.max_tokens)  # warm-up: first calls are slower
        runs = [load(url, name, image_url, int(n), args.requests, args.max_tokens) for n in args.clients.split(",")]
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            peak_batch = [line for line in response.read().decode().splitlines()
                          if line.startswith("moevlm_batch_size_peak")]
        result = {"runs": runs, "peak_batch": int(float(peak_batch[0].split()[-1])) if peak_batch else None,
                  "peak_memory_mib": peak_memory_mib(process.pid) if process else None}
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    base = runs[0]["tokens_per_s"] or 1
    for run in runs:
        run["gain"] = round(run["tokens_per_s"] / base, 2)
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'gain':>5} "
          f"{'ttft p50':>9} {'ttft p95':>9} {'lat p50':>8} {'lat p95':>8}")
    for r in runs:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>7.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['gain']:>5.2f} {r['ttft_p50_s']:>9.3f} {r['ttft_p95_s']:>9.3f} "
              f"{r['latency_p50_s']:>8.3f} {r['latency_p95_s']:>8.3f}")
    print(f"peak batch {result['peak_batch']}, peak server memory {result['peak_memory_mib']} MiB")
    return result


if __name__ == "__main__":
    main()
