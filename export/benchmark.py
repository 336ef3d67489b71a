"""Per-format benchmark: size, held-out top-1, batch-1 latency (p50/p95), batch-32 throughput, peak memory.

    python export/benchmark.py [--checkpoint RUN/best.pt] [--threads 2]

Every format gets the same preprocessed arrays and thread count; latency is measured after warm-up as
the median and 95th percentile of many runs. Writes benchmark.md, benchmark.json and benchmark.png.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from pathlib import Path

import numpy as np
import torch

from core.errors import run_cli
from core.memory import in_use_mb
from export.common import exported
from export.quantize import THROUGHPUT_BATCH, batch_throughput
from export.validate import cycled_logits, runner, torch_runner
from training.runs import write_json


class PeakMemory:
    """Samples the memory this process holds for live objects (core.memory.in_use_mb) every 5 ms in a thread;
    `peak - start` is what loading + running a format added at its worst moment."""

    def __init__(self) -> None:
        self.start = self.peak = in_use_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, in_use_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, in_use_mb())  # what is still held now counts even if no sample caught it
        return max(0.0, self.peak - self.start)


def time_format(run, x: np.ndarray, runs: int) -> dict[str, float]:
    """Batch-1 latency after warm-up: median and 95th percentile of `runs` calls."""
    one = np.ascontiguousarray(x[:1])
    for _ in range(5):
        run(one)
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        run(one)
        lat.append(1e3 * (time.perf_counter() - t))
    return {"p50_ms": float(np.median(lat)), "p95_ms": float(np.percentile(lat, 95))}


def benchmark(
    model: torch.nn.Module,
    ckpt_path: Path,
    paths: dict[str, Path],
    x: np.ndarray,
    y: np.ndarray,
    threads: int,
    runs: int,
    known: dict[str, dict] | None = None,
) -> list[dict]:
    """One row per format. `known` (format -> {"accuracy", "img_per_s"} measured by validation on the same
    images, threads and batch size) skips recomputing those; batch-1 latency is always measured here."""
    torch.set_num_threads(threads)
    rows = []
    formats = {
        "pytorch": (ckpt_path, lambda: torch_runner(model.eval())),
        **{k: (p, (lambda p=p: runner(p, threads))) for k, p in paths.items()},
    }
    known = known or {}
    missing = [f for f in formats if known.get(f, {}).get("accuracy") is None]
    truth = y  # unlabelled images (-1) are scored against PyTorch's prediction once it is known: agreement
    for name, (path, make) in formats.items():
        gc.collect()  # drop the previous format before measuring this one
        mem = PeakMemory()
        run = make()
        timing: dict = time_format(run, x, runs)
        timing["peak_mem_growth_mb"] = mem.stop()  # load + batch-1 inference: what a deployed process holds
        given = known.get(name, {})
        accuracy = given.get("accuracy")
        if accuracy is None or (name == "pytorch" and missing and (y < 0).any()):
            pred = cycled_logits(run, x, (THROUGHPUT_BATCH,)).argmax(1)
            if name == "pytorch":
                truth = np.where(y >= 0, y, pred)
            if accuracy is None:
                accuracy = float(100 * (pred == truth).mean())
        timing["img_per_s"], timing["img_per_s_from"] = given.get("img_per_s"), "validation"
        if timing["img_per_s"] is None:
            timing["img_per_s"], timing["img_per_s_from"] = batch_throughput(run, x), "benchmark"
        row = {
            "format": name,
            "file": path.name,
            "size_mb": path.stat().st_size / 2**20,
            "accuracy": accuracy,
            **timing,
            "threads": threads,
        }
        rows.append(row)
        del run  # the next format's starting point must not include this one
        print(f"  {name:<19} {row['p50_ms']:8.2f} ms p50  {row['img_per_s']:8.1f} img/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["format"] == "onnx_fp32"), rows[0])
    lines = [
        "| format | file | size MB | held-out top-1 | p50 ms (b1) | p95 ms (b1) | img/s (b32) | "
        "vs ORT fp32 | peak memory growth MB (load + b1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['file']} | {r['size_mb']:.2f} | {r['accuracy']:.2f} % | {r['p50_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {r['img_per_s']:.1f} | {r['img_per_s'] / base['img_per_s']:.2f}x | "
            f"{r['peak_mem_growth_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["p50_ms"], r["accuracy"], s=30 + 8 * r["size_mb"])
        ax.annotate(r["format"], (r["p50_ms"], r["accuracy"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(
        xscale="log",
        xlabel="batch-1 latency p50 (ms, log)",
        ylabel="held-out top-1 (%)",
        title="accuracy vs latency (marker size ~ file size)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], out: Path, device: str) -> str:
    md = f"# Benchmark\n\n{device}\n\n{table(rows)}\n"
    (out / "benchmark.md").write_text(md)
    write_json(out / "benchmark.json", {"device": device, "rows": rows})
    plot(rows, out / "benchmark.png")
    return md


def device_line(threads: int) -> str:
    import os
    import platform

    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else "?"
    )
    return f"CPU: {cpu}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark every exported format of a model.")
    p.add_argument("--checkpoint", help="checkpoint or run folder (default artifacts/runs/latest/best.pt)")
    p.add_argument("--export-dir", type=Path, help="folder with the exports (default <run>/export)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per format")
    p.add_argument("--max-images", type=int, default=300, help="held-out images for accuracy (0 = all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    model, path, d, paths, held, _ = exported(args.checkpoint, args.export_dir, args.max_images)
    rows = benchmark(model, path, paths, held.x, held.y, args.threads, args.runs)
    print(write_outputs(rows, d, device_line(args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
