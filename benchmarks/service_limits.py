"""``fuselabel serve`` against decompression bombs and stalled sockets: memory, answers, /health latency.

    python benchmarks/service_limits.py --model MODEL_DIR [--serve-args "--max-megapixels 64"] [--sockets 1000]

Starts ``fuselabel serve MODEL_DIR`` (with ``--serve-args``) on a free loopback port and measures, printing
each figure:

1. idle: the server's resident memory after start and one warm-up prediction;
2. one bomb batch: a /predict/batch of 32 PNGs of 8000 x 8000 pixels (one colour, so a small upload);
3. 40 bomb batches at once (from 40 threads);
4. stalled sockets: ``--sockets`` connections, half sending nothing and half half a request head, then
   /health five times while they are open (the slowest answer), and how many the server closed after its
   header timeout;
5. a /metrics scrape.

For 2 and 3: the statuses, the time, and the peak memory above idle (sampled every 0.1 s from
/proc/PID/status, or psutil). Exits 1 if any answer is a 5xx other than 503 or fails outright, if memory
rises more than 500 MB above idle, or if /health takes over 1 s. Stops the server with SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import io
import resource
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from load import KEY, MemorySampler, free_port, rss_bytes, start_server, stop

MB = 2**20


def bomb_png(side: int = 8000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def measured(pid: int, idle: int, work):
    """(result of work(), seconds, peak memory above idle in MiB)."""
    sampler = MemorySampler(pid, every=0.1)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = work()
    finally:
        seconds = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    peak = max((rss for _, rss in sampler.samples), default=idle)
    return result, seconds, (peak - idle) / MB


def statuses(responses) -> Counter:
    return Counter(
        str(r.status_code) if isinstance(r, httpx.Response) else f"failed ({type(r).__name__})" for r in responses
    )


def stalled_sockets(port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket]) -> int:
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--serve-args", default="", help="more options for fuselabel serve, in one string")
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--header-wait", type=float, default=12, help="seconds to wait before counting closed sockets")
    args = ap.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sockets + 512)), hard))
    bomb = base64.b64encode(bomb_png()).decode()
    batch = [{"caption": "a red square", "image_base64": bomb} for _ in range(32)]
    print(
        f"bomb: 8000 x 8000 PNG of {len(bomb) * 3 // 4 / 1e3:.0f} kB; batch of 32: "
        f"{len(str(batch)) / 1e6:.1f} MB of JSON"
    )
    port, ok = free_port(), True
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = start_server(args.model, port, shlex.split(args.serve_args), log)
        try:
            http = httpx.Client(base_url=url, timeout=600, headers=KEY)
            http.post("/predict", data={"caption": "warm up"})
            time.sleep(1)
            idle = rss_bytes(proc.pid)
            limits = http.get("/info").json()["limits"]
            print(f"server: fuselabel serve {args.serve_args or '(defaults)'}; limits {limits}")
            print(f"idle resident memory: {idle / MB:.0f} MiB")

            one, secs, rise = measured(proc.pid, idle, lambda: http.post("/predict/batch", json=batch))
            detail = "" if one.status_code == 200 else f" ({one.json()['detail'][:90]})"
            print(f"one batch of 32 bombs: {one.status_code}{detail} in {secs:.1f} s; peak +{rise:.0f} MiB")
            ok &= one.status_code < 500 and rise <= 500

            def forty():
                def send(_):
                    try:
                        return httpx.post(f"{url}/predict/batch", json=batch, timeout=600, headers=KEY)
                    except httpx.HTTPError as err:
                        return err

                with ThreadPoolExecutor(40) as pool:
                    return list(pool.map(send, range(40)))

            many, secs, rise = measured(proc.pid, idle, forty)
            counts = statuses(many)
            print(
                f"40 batches of 32 bombs at once: {dict(sorted(counts.items()))} in {secs:.1f} s; peak +{rise:.0f} MiB"
            )
            ok &= all(k.isdigit() and (int(k) < 500 or k == "503") for k in counts) and rise <= 500

            socks = stalled_sockets(port, args.sockets)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                status = httpx.get(f"{url}/health", timeout=10).status_code
                times.append(time.perf_counter() - t0)
                ok &= status == 200
            print(f"{args.sockets} stalled sockets open: /health 200 in at most {1000 * max(times):.0f} ms (5 tries)")
            ok &= max(times) <= 1
            time.sleep(args.header_wait)
            closed = closed_by_server(socks)
            print(f"after {args.header_wait:g} s: {closed} of {args.sockets} stalled sockets closed by the server")
            for s in socks:
                s.close()

            scrape = http.get("/metrics")
            lines = [
                x
                for x in scrape.text.splitlines()
                if x.startswith(
                    ("fuselabel_requests_total{", "fuselabel_photos_decoded_total", "fuselabel_requests_refused_total")
                )
            ]
            print(f"/metrics: {scrape.status_code}, {len(scrape.text.splitlines())} lines; " + "; ".join(lines))
            ok &= scrape.status_code == 200
            threading.Event().wait(0.5)
        finally:
            code = stop(proc)
    print(f"server exit status after SIGTERM: {code}")
    print("OK" if ok and code == 0 else "FAIL")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
