"""A bounded load test of ``fuselabel serve`` on loopback: many clients, good and bad requests, no 5xx.

    python benchmarks/load.py --model MODEL_DIR [--requests 2000] [--clients 16] [--images DIR]

Starts ``fuselabel serve MODEL_DIR`` on a free loopback port, waits for /health, then sends
``--requests`` requests from ``--clients`` threads (httpx), drawn at random (seeded) from this mix:

    photo+caption 30 %, caption only 12 %, photo only 12 %, batch of 8 4 %, explain 2 %,
    oversized upload 10 %, not an image 10 %, empty form 10 %, very long caption 10 %
    (half of them within the caption limit, half beyond it)

Photos are synthetic JPEGs (320-640 px) unless ``--images`` names a folder of real ones. Prints
throughput, p50 / p99 latency (all requests and per kind), the count of each status per kind, and
the server's resident memory sampled every half second (psutil when installed, else
/proc/PID/status VmRSS). With ``$FUSELABEL_API_KEY`` set, the server requires it and every request sends
it. Exits 1 if any response is a 5xx or a request fails outright, and stops
the server with SIGTERM, expecting it to exit 0.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MIX = {
    "photo+caption": 30,
    "caption only": 12,
    "photo only": 12,
    "batch of 8": 4,
    "explain": 2,
    "oversized upload": 10,
    "not an image": 10,
    "empty form": 10,
    "very long caption": 10,
}
WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "riding",
    "skateboard",
    "street",
    "kite",
    "beach",
    "red",
    "car",
    "bus",
    "train",
    "table",
    "pizza",
    "sitting",
    "on",
    "next",
    "to",
]

# The server inherits the environment: with a key there, every request carries it.
KEY = {"X-API-Key": os.environ["FUSELABEL_API_KEY"]} if os.environ.get("FUSELABEL_API_KEY") else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_photos(n: int, rng: np.random.Generator) -> list[bytes]:
    """Smooth random colour fields as JPEGs (noise would make them unrealistically large)."""
    out = []
    for _ in range(n):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def folder_photos(folder: Path, n: int) -> list[bytes]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not paths:
        raise SystemExit(f"{folder}: no .jpg or .png photos")
    return [p.read_bytes() for p in paths]


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:  # the process is gone
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()
        self.t0 = time.perf_counter()

    def run(self):
        while not self.stop.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.perf_counter() - self.t0, rss))
            self.stop.wait(self.every)


class Requests:
    """The request for each kind, built from shared photos and a per-request random generator."""

    def __init__(self, photos: list[bytes], label: str, max_upload_bytes: int, max_caption_chars: int):
        self.photos, self.label = photos, label
        self.max_upload_bytes, self.max_caption_chars = max_upload_bytes, max_caption_chars

    def caption(self, rng: random.Random, words: int = 10) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    def files(self, rng: random.Random, data: bytes | None = None):
        return {"image": ("photo.jpg", data if data is not None else rng.choice(self.photos), "image/jpeg")}

    def send(self, http: httpx.Client, kind: str, rng: random.Random) -> httpx.Response:
        if kind == "photo+caption":
            return http.post("/predict", files=self.files(rng), data={"caption": self.caption(rng)})
        if kind == "caption only":
            return http.post("/predict", data={"caption": self.caption(rng)})
        if kind == "photo only":
            return http.post("/predict", files=self.files(rng))
        if kind == "batch of 8":
            import base64

            items = [
                {"caption": self.caption(rng), "image_base64": base64.b64encode(rng.choice(self.photos)).decode()}
                for _ in range(8)
            ]
            return http.post("/predict/batch", json=items)
        if kind == "explain":
            return http.post(
                "/explain", files=self.files(rng), data={"caption": self.caption(rng), "label": self.label}
            )
        if kind == "oversized upload":
            return http.post("/predict", files=self.files(rng, os.urandom(1024) * (self.max_upload_bytes // 1024 + 64)))
        if kind == "not an image":
            return http.post("/predict", files=self.files(rng, b"%PDF-1.4 " + os.urandom(2048)))
        if kind == "empty form":
            return http.post("/predict", data={})
        if kind == "very long caption":
            chars = self.max_caption_chars + (-500 if rng.random() < 0.5 else 5000)
            text = (self.caption(rng, chars // 4) + " ")[:chars]
            return http.post("/predict", data={"caption": text})
        raise ValueError(kind)


def start_server(model: str, port: int, extra: list[str], log) -> subprocess.Popen:
    """``fuselabel serve`` in a subprocess, its output (one access-log line a request) into the file ``log``."""
    cmd = [sys.executable, "-m", "fuselabel.cli", "serve", model, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"fuselabel serve exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("fuselabel serve did not answer /health within 300 s")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def drive(args, base: str, photos: list[bytes], pid: int) -> tuple[list, float, list]:
    """Send the requests; returns ([(kind, status, seconds)], elapsed seconds, [(t, rss bytes)])."""
    info = httpx.get(f"{base}/info", headers=KEY).json()
    requests = Requests(
        photos, str(info["labels"][0]["id"]), int(args.max_upload_mb * 1e6), info["limits"]["max_caption_chars"]
    )
    kinds = random.Random(args.seed).choices(list(MIX), weights=list(MIX.values()), k=args.requests)
    local = threading.local()
    results: list[tuple[str, int | str, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=base, timeout=300, headers=KEY)
        t0 = time.perf_counter()
        try:
            status: int | str = requests.send(
                local.http, kinds[i], random.Random(args.seed * 1_000_003 + i)
            ).status_code
        except httpx.HTTPError as err:
            status = f"failed ({type(err).__name__})"
            local.http = httpx.Client(base_url=base, timeout=300, headers=KEY)  # the connection may be gone
        with lock:
            results.append((kinds[i], status, time.perf_counter() - t0))

    sampler = MemorySampler(pid)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.requests)))
    elapsed = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    return results, elapsed, sampler.samples


def stop(proc: subprocess.Popen) -> int | str:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed after 60 s"


def report(model_id: str, clients: int, results: list, elapsed: float, samples: list, code) -> int:
    latencies = [r[2] for r in results]
    print(
        f"model {model_id}: {len(results)} requests from {clients} clients in {elapsed:.1f} s "
        f"= {len(results) / elapsed:.1f} requests/s"
    )
    print(
        f"latency (all): p50 {1000 * percentile(latencies, 50):.0f} ms, p99 {1000 * percentile(latencies, 99):.0f} ms"
    )
    by_kind: dict[str, list] = defaultdict(list)
    for kind, status, seconds in results:
        by_kind[kind].append((status, seconds))
    print(f"{'kind':20s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s}  statuses")
    for kind in MIX:
        rows = by_kind.get(kind, [])
        if not rows:
            continue
        times = [s for _, s in rows]
        counts = Counter(str(st) for st, _ in rows)
        print(
            f"{kind:20s} {len(rows):5d} {1000 * percentile(times, 50):8.0f} {1000 * percentile(times, 99):8.0f}  "
            + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        )
    totals = Counter(str(st) for _, st, _ in results)
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(totals.items())))
    if samples:
        mib = [rss / 2**20 for _, rss in samples]
        step = max(1, len(mib) // 10)
        trace = ", ".join(f"{t:.0f}s {rss / 2**20:.0f}" for t, rss in samples[::step])
        print(
            f"server resident memory (MiB): start {mib[0]:.0f}, peak {max(mib):.0f}, end {mib[-1]:.0f}; "
            f"over time: {trace}"
        )
    print(f"server exit status after SIGTERM: {code}")
    bad = sum(v for k, v in totals.items() if not k.isdigit() or int(k) >= 500)
    if bad or code != 0:
        print(f"FAIL: {bad} responses were 5xx or failed outright; exit status {code}")
        return 1
    print("OK: no 5xx, no failed requests, clean stop")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder to serve")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--images", type=Path, help="folder of real photos (default: synthetic JPEGs)")
    ap.add_argument("--max-upload-mb", type=float, default=10, help="passed to fuselabel serve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    photos = folder_photos(args.images, 64) if args.images else synthetic_photos(32, np.random.default_rng(args.seed))
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = start_server(args.model, port, ["--max-upload-mb", str(args.max_upload_mb)], log)
        try:
            model_id = httpx.get(f"http://127.0.0.1:{port}/health").json()["model"]
            results, elapsed, samples = drive(args, f"http://127.0.0.1:{port}", photos, proc.pid)
        finally:
            code = stop(proc)
    return report(model_id, args.clients, results, elapsed, samples, code)


if __name__ == "__main__":
    sys.exit(main())
