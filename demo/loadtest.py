"""Load test a running demo: concurrency levels for a fixed duration, latency percentiles, errors, RSS.

    python demo/app.py --model artifacts/runs/NAME &            # start the server first
    python demo/loadtest.py --url http://127.0.0.1:7860/ --backend onnx_int8 --levels 1 4 8 16 --seconds 30

Client-side latency includes Gradio's queue and HTTP; `server ms` is what the app itself measured
(decode + preprocess + inference) for the same requests. Only talks to the URL it is given (use loopback).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.memory import rss_mb as process_rss_mb


def make_jpeg(path: Path, side: int = 1024) -> Path:
    """A 1-megapixel photo-like JPEG (smooth gradients + texture), the size phones upload after resizing."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side] / side
    rgb = np.stack([np.sin(6 * xx) * 80 + 120, np.cos(5 * yy) * 70 + 110, (xx + yy) * 60 + 60], -1)
    rgb += rng.normal(0, 12, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def rss_mb(pid: int | None) -> float:
    return process_rss_mb(pid) if pid else float("nan")


def worker(url: str, image: str, model: str, backend: str, deadline: float, out: list, lock: threading.Lock):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        try:
            _, table, _ = client.predict(handle_file(image), None, model, [backend], 1, api_name="/predict")
            row = table["data"][0]
            rec = ("ok", time.perf_counter() - t, float(row[3]) + float(row[4]))
        except Exception as e:
            kind = "queue_full" if "queue" in str(e).lower() and "full" in str(e).lower() else "error"
            rec = (kind, time.perf_counter() - t, float("nan"), f"{type(e).__name__}: {str(e)[:120]}")
        with lock:
            out.append(rec)


def http_worker(url: str, image: str, model: str, backend: str, deadline: float, out: list, lock: threading.Lock):
    """The same three server steps as gradio_client (upload, join the queue, read the result stream) over Gradio's
    documented REST routes with one keep-alive connection: a lighter client, so more of the 2 cores go to the
    server being measured."""
    import json

    import httpx

    files = {"files": (Path(image).name, Path(image).read_bytes())}
    with httpx.Client(base_url=url, timeout=60) as h:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                path = h.post("gradio_api/upload", files=files).raise_for_status().json()[0]
                payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, None, model, [backend], 1]}
                r = h.post("gradio_api/call/predict", json=payload)
                if r.status_code == 503:
                    rec = ("queue_full", time.perf_counter() - t, float("nan"))
                else:
                    event = r.raise_for_status().json()["event_id"]
                    text = h.get(f"gradio_api/call/predict/{event}").raise_for_status().text
                    if "event: complete" not in text:
                        raise RuntimeError(text.strip().splitlines()[-1][:120])
                    line = next(x for x in text.splitlines() if x.startswith("data:"))
                    row = json.loads(line[5:])[1]["data"][0]
                    rec = ("ok", time.perf_counter() - t, float(row[3]) + float(row[4]))
            except Exception as e:
                rec = ("error", time.perf_counter() - t, float("nan"), f"{type(e).__name__}: {str(e)[:120]}")
            with lock:
                out.append(rec)


def run_level(
    url: str, image: str, model: str, backend: str, clients: int, seconds: float, client: str = "gradio"
) -> dict:
    out: list = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    target = http_worker if client == "http" else worker
    threads = [
        threading.Thread(target=target, args=(url, image, model, backend, deadline, out, lock)) for _ in range(clients)
    ]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ok = np.array([r[1] for r in out if r[0] == "ok"]) * 1e3
    server = np.array([r[2] for r in out if r[0] == "ok"])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    first_error = next((r[3] for r in out if r[0] == "error"), "")
    return {
        "first_error": first_error,
        "clients": clients,
        "requests": len(out),
        "ok": len(ok),
        "req_per_s": len(ok) / wall,
        "p50_ms": pct(ok, 50),
        "p95_ms": pct(ok, 95),
        "p99_ms": pct(ok, 99),
        "server_p50_ms": pct(server, 50),
        "queue_full": sum(r[0] == "queue_full" for r in out),
        "errors": sum(r[0] == "error" for r in out),
        "queue_full_p50_ms": pct(np.array([r[1] for r in out if r[0] == "queue_full"]) * 1e3, 50),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--model", required=True, help="served model name (the model dropdown value)")
    p.add_argument("--backend", default="onnx_int8")
    p.add_argument("--image", help="image to send (default: a generated 1-megapixel JPEG)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--server-pid", type=int, help="server process id, to report its RSS before/after")
    p.add_argument(
        "--client",
        choices=("gradio", "http"),
        default="gradio",
        help="gradio_client (what users script with) or raw HTTP on Gradio's REST routes (lighter)",
    )
    args = p.parse_args(argv)
    model = args.model
    image = args.image or str(make_jpeg(Path(tempfile.mkdtemp()) / "1mp.jpg"))
    before = rss_mb(args.server_pid)
    print(
        "| clients | requests | ok | req/s | p50 ms | p95 ms | p99 ms | server p50 ms | queue full (p50 ms) | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for level in args.levels:
        r = run_level(args.url, image, model, args.backend, level, args.seconds, args.client)
        print(
            f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_p50_ms']:.1f} | "
            f"{r['queue_full']} ({r['queue_full_p50_ms']:.0f}) | {r['errors']} |",
            flush=True,
        )
        if r["first_error"]:
            print(f"  first error at {level} clients: {r['first_error']}")
    print(f"server RSS: {before:.0f} MB before, {rss_mb(args.server_pid):.0f} MB after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
