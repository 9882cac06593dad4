"""Serving load test: N concurrent clients x M greedy chat completions each, for each N given, measured
twice in one run: through HTTP (streamed, against a live `moevlm serve` on 127.0.0.1) and against the
engine alone (the same requests submitted in-process as jobs, no HTTP). Reports requests/s, generated
tokens/s, p50/p95 time to first token and latency, the gain over the first client count, and HTTP's
share of the engine's tokens/s; then whether the largest client count meets the serving goal (HTTP at
least 80 % of the engine, and at least 4x the first client count through HTTP).

    python benchmarks/serve_load.py --model DIR [--clients 1,4,16] [--requests 8] [--max-tokens 32]
                                    [--image PNG] [--runs 3]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-name NAME   (HTTP only)

Every request asks for a greedy caption of the same picture, so each client count does the same work
per request. Each client keeps one HTTP connection open (keep-alive), as the OpenAI clients do. One
request warms each side up first. Each client count runs on both sides back to back (engine, then HTTP),
so both see the same machine; --runs R repeats the whole series R times (one server, one engine).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

GOAL_SHARE, GOAL_GAIN = 0.80, 4.0


def picture_url(path: Path | None = None) -> str:
    if path is not None:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((16, 16, 80, 80), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(model: str, image_url: str, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


class HttpClient:
    """One client's keep-alive connection; ``ask`` sends one streamed request: (time to first token,
    latency, completion tokens)."""

    def __init__(self, url: str, body: dict):
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        self.body = json.dumps(body).encode()

    def ask(self) -> tuple[float, float, int]:
        started, first, tokens = time.perf_counter(), None, 0
        self.connection.request("POST", "/v1/chat/completions", self.body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}: {response.read()[:200]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        latency = time.perf_counter() - started
        return (latency if first is None else first), latency, tokens

    def close(self) -> None:
        self.connection.close()


class EngineClient:
    """The same request as a job submitted to an in-process engine, waited for on this thread."""

    def __init__(self, engine, job_args: dict):
        self.engine, self.job_args = engine, job_args

    def ask(self) -> tuple[float, float, int]:
        from moevlm.serve.engine import Job

        done, first, outcome = threading.Event(), [], []
        started = time.perf_counter()

        def emit(event):
            if event[0] == "delta" and event[1] and not first:
                first.append(time.perf_counter() - started)
            if event[0] != "delta":
                outcome.append(event)
                done.set()

        self.engine.submit(Job(emit=emit, **self.job_args))
        done.wait()
        latency = time.perf_counter() - started
        if outcome[0][0] != "done":
            raise OSError(f"engine: {outcome[0][1]}")
        return (first[0] if first else latency), latency, outcome[0][2]["completion_tokens"]

    def close(self) -> None:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) a process has used so far: this one, or (Linux) process ``pid``."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(make_client, clients: int, requests: int, cpu_seconds=lambda: None) -> dict:
    """``clients`` threads, each sending ``requests`` requests one after another on its own client.
    ``cpu_seconds``: the serving process's CPU time so far (None where unknown), for its CPU per request."""
    results, errors = [], []
    connections = [make_client() for _ in range(clients)]

    def client(connection):
        for _ in range(requests):
            try:
                results.append(connection.ask())
            except (OSError, http.client.HTTPException) as err:
                errors.append(str(err))
        connection.close()

    threads = [threading.Thread(target=client, args=(connection,)) for connection in connections]
    cpu_before, started = cpu_seconds(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu_after = time.perf_counter() - started, cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None or not results else (cpu_after - cpu_before) / len(results)
    first, latency, tokens = zip(*results) if results else ((0.0,), (0.0,), (0,))
    return {"clients": clients, "requests": len(results), "errors": len(errors), "tokens": sum(tokens),
            "seconds": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(sum(tokens) / wall, 2),
            "ttft_p50_s": round(statistics.median(first), 4), "ttft_p95_s": round(percentile(first, 0.95), 4),
            "latency_p50_s": round(statistics.median(latency), 4),
            "latency_p95_s": round(percentile(latency, 0.95), 4),
            "cpu_ms_per_request": None if cpu is None else round(cpu * 1000, 3),
            "first_error": errors[0] if errors else None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moevlm", "serve", "--model", str(model_dir), "--port",
                                str(port), "--max-batch", str(max_batch), *extra], stdout=subprocess.DEVNULL)
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


class HttpSide:
    """Load through HTTP on a running server at ``url`` (its process ``pid``, if this script started it)."""

    def __init__(self, url: str, body: dict, pid: int | None = None):
        self.url, self.body, self.pid = url, body, pid
        HttpClient(url, body).ask()  # warm-up: first calls are slower

    def measure(self, clients: int, requests: int) -> dict:
        cpu = (lambda: process_cpu_seconds(self.pid)) if self.pid is not None else (lambda: None)
        return load(lambda: HttpClient(self.url, self.body), clients, requests, cpu)

    def peak_batch(self) -> int | None:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            peak = [line for line in response.read().decode().splitlines() if line.startswith("moevlm_batch_size_peak")]
        return int(float(peak[0].split()[-1])) if peak else None


class EngineSide:
    """The same requests as jobs of an engine in this process: their prompt ids and prepared pixels as
    the server makes them (once: this side measures the engine, not image decoding). ``close`` stops it."""

    def __init__(self, model_dir: Path, name: str, body: dict, max_batch: int, max_queue: int = 64,
                 compile: bool = False):
        from moevlm.data.images import open_image_bytes
        from moevlm.serve.chat import parse_request, request_prompt
        from moevlm.serve.engine import Engine
        from moevlm.serve.images import data_url_bytes

        self.engine = Engine(model_dir, device="cpu", max_batch=max_batch, max_queue=max_queue, compile=compile)
        self.engine.start()
        self.engine.ready.wait()
        if self.engine.failed is not None:
            raise SystemExit(f"the engine failed to load: {self.engine.failed}")
        req = parse_request(body, name)
        ids = request_prompt(req, self.engine.tokenizer, self.engine.config.model.decoder.max_text_len,
                             self.engine.max_images)
        room = self.engine.token_limit(ids)
        pixels = self.engine.prepare_image(open_image_bytes(data_url_bytes(req.image_urls[0])))
        self.job_args = {"prompt_ids": ids, "pixels": pixels, "max_tokens": min(req.max_tokens or room, room),
                         "sampling": req.sampling}
        EngineClient(self.engine, self.job_args).ask()  # warm-up

    def measure(self, clients: int, requests: int) -> dict:
        return load(lambda: EngineClient(self.engine, self.job_args), clients, requests, process_cpu_seconds)

    def peak_batch(self) -> int:
        return self.engine.metrics.peak_batch_size

    def close(self) -> None:
        self.engine.stop(60)


def add_gains(side: dict) -> None:
    base = side["runs"][0]["tokens_per_s"] or 1
    for run in side["runs"]:
        run["gain"] = round(run["tokens_per_s"] / base, 2)


def print_table(title: str, side: dict, engine: dict | None) -> None:
    print(title)
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'gain':>5} "
          f"{'ttft p50':>9} {'ttft p95':>9} {'lat p50':>8} {'lat p95':>8} {'cpu ms/req':>10}"
          + (f" {'of engine':>9}" if engine else ""))
    for index, r in enumerate(side["runs"]):
        share = f" {r['tokens_per_s'] / (engine['runs'][index]['tokens_per_s'] or 1):>9.0%}" if engine else ""
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>7.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['gain']:>5.2f} {r['ttft_p50_s']:>9.3f} {r['ttft_p95_s']:>9.3f} "
              f"{r['latency_p50_s']:>8.3f} {r['latency_p95_s']:>8.3f} "
              f"{'-' if r['cpu_ms_per_request'] is None else format(r['cpu_ms_per_request'], '.2f'):>10}{share}")
        if r["first_error"]:
            print(f"        first error: {r['first_error']}")


def verdict(served: dict, engine: dict) -> dict:
    """The serving goal at the largest client count: HTTP's share of the engine, and HTTP's gain over
    one client (judged only when the first client count is 1). Judged on the unrounded figures."""
    first, last, engine_last = served["runs"][0], served["runs"][-1], engine["runs"][-1]
    share = last["tokens_per_s"] / (engine_last["tokens_per_s"] or 1)
    gain = last["tokens_per_s"] / (first["tokens_per_s"] or 1)
    errors = sum(run["errors"] for run in served["runs"] + engine["runs"])
    return {"clients": last["clients"], "share": round(share, 4), "gain": round(gain, 3), "errors": errors,
            "one_client": first["clients"] == 1,
            "met": share >= GOAL_SHARE and gain >= GOAL_GAIN and first["clients"] == 1 and not errors}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder: measure its engine in-process, then start "
                                                    "`moevlm serve` on it and measure through HTTP")
    parser.add_argument("--url", help="an already running server instead (HTTP only, no engine side)")
    parser.add_argument("--model-name", help="the model's name in the API (default: the --model folder's name)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16); "
                                                            "gains are over the first")
    parser.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image", type=Path, help="the picture every request asks about (default: a red square)")
    parser.add_argument("--max-batch", type=int, default=16, help="for the engine and the server this script starts")
    parser.add_argument("--runs", type=int, default=1, help="measure both sides this many times, alternating")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more argument for `moevlm serve` (repeatable), e.g. --server-arg=--quantize=int8")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.url is None):
        parser.error("give --model or --url")
    name = args.model_name or (args.model.resolve().name if args.model else None)
    if name is None:
        parser.error("--url needs --model-name")
    counts = [int(n) for n in args.clients.split(",")]
    body = request_body(name, picture_url(args.image), args.max_tokens)
    result = {"load_average_before": [round(x, 2) for x in os.getloadavg()], "runs": []}
    engine = process = None
    try:
        if args.model is not None:
            # The engine decodes as the server does: compiled unless a --server-arg says --no-compile.
            engine = EngineSide(args.model, name, body, args.max_batch, max(64, max(counts)),
                                compile="--no-compile" not in args.server_arg)
            process, url = start_server(args.model, args.max_batch, args.server_arg)
        else:
            url = args.url.rstrip("/")
        served = HttpSide(url, body, process.pid if process else None)
        for number in range(args.runs):
            # each client count on both sides back to back, so both see the same machine
            run = {"http": {"runs": []}, **({"engine": {"runs": []}} if engine else {})}
            for clients in counts:
                if engine is not None:
                    run["engine"]["runs"].append(engine.measure(clients, args.requests))
                run["http"]["runs"].append(served.measure(clients, args.requests))
            run["http"]["peak_batch"] = served.peak_batch()
            run["http"]["peak_memory_mib"] = peak_memory_mib(process.pid) if process else None
            for side in run.values():
                add_gains(side)
            if engine is not None:
                run["engine"]["peak_batch"] = engine.peak_batch()
                run["goal"] = verdict(run["http"], run["engine"])
            result["runs"].append(run)
            if not args.json:
                report(number, args.runs, run)
    finally:
        if engine is not None:
            engine.close()
        if process is not None:
            process.terminate()
            process.wait(60)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"load average before {result['load_average_before']}, after {result['load_average_after']} "
              f"({os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
        if engine is not None:
            met = sum(run["goal"]["met"] for run in result["runs"])
            print(f"goal met in {met} of {args.runs} run{'s' if args.runs > 1 else ''}")
    return result


def report(number: int, runs: int, run: dict) -> None:
    print(f"== run {number + 1} of {runs}")
    if "engine" in run:
        print_table("engine in-process (no HTTP):", run["engine"], None)
    print_table("through HTTP (streamed):", run["http"], run.get("engine"))
    print(f"peak batch: HTTP {run['http']['peak_batch']}"
          + (f", engine {run['engine']['peak_batch']}" if "engine" in run else "")
          + f"; peak server memory {run['http']['peak_memory_mib']} MiB")
    if "goal" in run:
        goal = run["goal"]
        gain = (f"{goal['gain']:.2f}x one client (>= {GOAL_GAIN:g}x)" if goal["one_client"]
                else "gain not judged (the first client count is not 1)")
        print(f"goal at {goal['clients']} clients: HTTP at {goal['share']:.1%} of the engine (>= {GOAL_SHARE:.0%}), "
              f"{gain}, {goal['errors']} errors: {'met' if goal['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
