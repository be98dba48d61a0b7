"""`zoo serve` latency: p50/p95 of `GET /api/search?text=` against the same search called in-process, with
8 concurrent clients, on the quick demo's registry. Prints JSON.

    python benchmarks/serve.py [--home H] [--clients 8] [--requests 200]

Without --home the quick demo is built in a temporary folder first (a few minutes; not timed). The
server runs as `zoo serve` in its own process, as a user would start it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import modelzoo

ZOO = [sys.executable, "-c", "from modelzoo.cli.main import run; run()"]
QUERIES = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a red square", "a blue circle"]


def latencies(call: Callable[[str], object], clients: int, requests: int) -> dict[str, float]:
    """Each of `clients` threads issues its share of `requests` back to back; per-request seconds."""
    def client(k: int) -> list[float]:
        times = []
        for i in range(k, requests, clients):
            started = time.perf_counter()
            call(QUERIES[i % len(QUERIES)])
            times.append(time.perf_counter() - started)
        return times

    for q in QUERIES:  # warm: encoder, index and caches loaded before timing
        call(q)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = np.array([t for ts in pool.map(client, range(clients)) for t in ts])
    wall = time.perf_counter() - started
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p95_ms": round(float(np.percentile(times, 95)) * 1e3, 2),
            "throughput_per_s": round(len(times) / wall, 1)}


def serve(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([*ZOO, "--home", str(home), "serve", "--port", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/api/models", timeout=5).read()
            return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("zoo serve did not answer within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="A registry holding the quick demo (built when omitted).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="zoo-serve-bench-")) / "zoo"
    if args.home is None:
        subprocess.run([*ZOO, "--home", str(home), "demo", "--quick"], check=True, stdout=subprocess.DEVNULL)
    zoo = modelzoo.open(home)
    lock = threading.Lock()  # as the server does: concurrent encoder loads in threads are not safe

    def search(q: str) -> object:
        with lock:
            return zoo.search(text=[q], top_k=10)

    in_process = latencies(search, args.clients, args.requests)
    server, url = serve(home)
    try:
        over_http = latencies(
            lambda q: urllib.request.urlopen(f"{url}/api/search?{urllib.parse.urlencode({'text': q})}").read(),
            args.clients, args.requests)
    finally:
        server.terminate()
        server.wait()
    print(json.dumps({
        "registry": "quick demo", "clients": args.clients, "requests": args.requests,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "in_process": in_process, "http": over_http,
        "http_overhead_p50_ms": round(over_http["p50_ms"] - in_process["p50_ms"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
