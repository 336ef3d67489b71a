"""Soak test the demo: its own server process, N clients for M minutes with a share of malformed uploads,
then a burst at 2x saturation. A benchmark script (minutes long), not a CI test.

    python demo/soak.py --model artifacts/runs/NAME --minutes 10 --clients 8 --malformed 0.10

Reports: requests by outcome (predicted / refused with a clear message / app error / server error),
latency percentiles, server RSS over time (growth measured from the end of warm-up), files in the
server's private upload cache (GRADIO_TEMP_DIR) during the run and after shutdown, and how fast excess
requests get their queue-full answer when 2x the queue capacity hammers it. Exit 1 when a target fails:
0 server errors, 0 app errors on good images, RSS growth < 5 %, no temp files left after shutdown.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from demo.launch import start_demo
from demo.loadtest import make_jpeg, rss_mb, run_level
from tools.malformed_corpus import build

ROOT = Path(__file__).resolve().parents[1]


def start_server(model: str, queue: int, concurrency: int, cache_minutes: float, tmp: Path):
    app_args = ["--queue-size", str(queue), "--concurrency", str(concurrency), "--cache-minutes", str(cache_minutes)]
    try:
        return start_demo(app_args + (["--model", model] if model else []), tmp.parent / "server.log", tmp, None, 300)
    except RuntimeError as e:
        raise SystemExit(f"soak: {e}") from None


def served_name(model: str) -> str:
    from demo.backends import served_from_path
    from demo.examples import imagenet_fallback

    return served_from_path(Path(model) if model else imagenet_fallback()).name


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def soak_worker(url, name, backend, good, corpus, share, seed, deadline, out, lock):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    rng = random.Random(seed)
    client = Client(url, verbose=False)
    while time.perf_counter() < deadline:
        case, path = rng.choice(corpus) if rng.random() < share else (None, good)
        t = time.perf_counter()
        try:
            client.predict(handle_file(str(path)), None, name, [backend], 1, api_name="/predict")
            kind = "predicted" if case is None or case.expect == "ok" else "accepted_bad"
        except AppError as e:
            kind = "refused" if case is not None and case.expect == "refuse" else f"app_error: {str(e)[:100]}"
        except Exception as e:  # HTTP 5xx, dropped connection, timeout: the server failed
            kind = f"server_error: {type(e).__name__}: {str(e)[:100]}"
        with lock:
            out.append((kind, time.perf_counter() - t))


def probe_queue(url: str, name: str, stop: threading.Event, out: list) -> None:
    """While saturated: a cheap valid request (model card) straight to the queue's HTTP endpoint, so the time to
    the queue-full answer is the server's, without the upload and SSE plumbing of gradio_client."""
    import httpx

    with httpx.Client(timeout=30) as h:
        while not stop.is_set():
            t = time.perf_counter()
            r = h.post(url + "gradio_api/call/model_card", json={"data": [name]})
            out.append((r.status_code, time.perf_counter() - t))
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="run folder / checkpoint / .onnx (default: what the demo picks)")
    p.add_argument("--backend", default="onnx_int8")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--malformed", type=float, default=0.10, help="share of uploads drawn from the corpus")
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--cache-minutes", type=float, default=2.0, help="server's upload cache lifetime")
    p.add_argument("--warmup-seconds", type=float, default=60.0)
    p.add_argument("--saturation-seconds", type=float, default=30.0)
    p.add_argument("--port", type=int, default=7871)
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    cache = work / "gradio"
    cache.mkdir()
    corpus = [(c, f) for c, f in build(work / "corpus") if not c.name.startswith("oversized")]
    good = make_jpeg(work / "1mp.jpg")
    name = served_name(args.model)
    proc, url = start_server(args.model, args.queue_size, args.concurrency, args.cache_minutes, cache)
    print(f"server pid {proc.pid} at {url}, model {name!r}, backend {args.backend}, cache {cache}", flush=True)
    out: list = []
    lock = threading.Lock()
    samples: list[tuple[float, float, int]] = []
    t0 = time.perf_counter()
    deadline = t0 + args.minutes * 60
    threads = [
        threading.Thread(
            target=soak_worker,
            args=(url, name, args.backend, good, corpus, args.malformed, i, deadline, out, lock),
        )
        for i in range(args.clients)
    ]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        samples.append((time.perf_counter() - t0, rss_mb(proc.pid), count_files(cache)))
        with lock:
            n = len(out)
        print(
            f"  t={samples[-1][0]:6.0f}s  requests {n:6d}  RSS {samples[-1][1]:7.1f} MB  cache files {samples[-1][2]}"
        )
        time.sleep(min(30.0, max(1.0, deadline - time.perf_counter())))
    for th in threads:
        th.join()
    samples.append((time.perf_counter() - t0, rss_mb(proc.pid), count_files(cache)))

    kinds: dict[str, int] = {}
    for k, _ in out:
        kinds[k.split(":")[0]] = kinds.get(k.split(":")[0], 0) + 1
    lat = np.array([s for k, s in out if k == "predicted"]) * 1e3
    warm = [r for t, r, _ in samples if t >= args.warmup_seconds] or [samples[-1][1]]
    growth = 100 * (samples[-1][1] - warm[0]) / warm[0]
    print(f"\n## Soak: {args.clients} clients, {args.minutes:g} min, {100 * args.malformed:.0f} % malformed uploads\n")
    print("| requests | predicted | refused (clear message) | app errors | server errors | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {len(out)} | {kinds.get('predicted', 0)} | {kinds.get('refused', 0)} | {kinds.get('app_error', 0)} | "
        f"{kinds.get('server_error', 0)} | {len(out) / (args.minutes * 60):.1f} | "
        f"{np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} |"
    )
    first_bad = next((k for k, _ in out if k.startswith(("app_error", "server_error", "accepted_bad"))), "")
    if first_bad:
        print(f"first failure: {first_bad}")
    print(
        f"\nserver RSS: {samples[0][1]:.0f} MB at start, {warm[0]:.0f} MB after warm-up, "
        f"{samples[-1][1]:.0f} MB at the end ({growth:+.1f} %); peak cache files {max(s[2] for s in samples)}"
    )

    sat_clients = 2 * (args.queue_size + args.concurrency)
    probes: list = []
    stop = threading.Event()
    prober = threading.Timer(2.0, probe_queue, (url, name, stop, probes))  # once the burst has filled the queue
    prober.start()
    r = run_level(url, str(good), name, args.backend, sat_clients, args.saturation_seconds)
    stop.set()
    prober.join()
    print(f"\n## Saturation: {sat_clients} clients (2x queue {args.queue_size} + {args.concurrency} running)\n")
    print("| requests | ok | queue full | queue-full p50 ms | ok p50 ms | ok p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['requests']} | {r['ok']} | {r['queue_full']} | {r['queue_full_p50_ms']:.0f} | {r['p50_ms']:.0f} | "
        f"{r['p99_ms']:.0f} | {r['errors']} |"
    )
    full = np.array([t for code, t in probes if code == 503]) * 1e3
    if len(full):
        print(
            f"\nraw HTTP probe of the queue while saturated: {len(full)}/{len(probes)} answered 503 queue-full, "
            f"p50 {np.percentile(full, 50):.1f} ms, max {full.max():.1f} ms"
        )
    t_stop = time.perf_counter()
    proc.send_signal(signal.SIGTERM)  # as docker/systemd stop it; the app empties its upload cache on the way out
    try:
        proc.wait(60)
        print(f"\nserver stopped in {time.perf_counter() - t_stop:.1f} s (exit code {proc.returncode})")
    except subprocess.TimeoutExpired:
        proc.kill()
        print("\nserver did not stop within 60 s of SIGTERM: killed")
    left = count_files(cache)
    print(f"files left in the upload cache after shutdown: {left}")
    failed = [
        msg
        for bad, msg in [
            (kinds.get("server_error", 0) > 0, "server errors"),
            (kinds.get("app_error", 0) > 0 or kinds.get("accepted_bad", 0) > 0, "wrong answers"),
            (growth >= 5.0, f"RSS grew {growth:.1f} %"),
            (left > 0, f"{left} temp files left"),
        ]
        if bad
    ]
    print("targets: " + ("all met" if not failed else "FAILED: " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
