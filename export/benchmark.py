"""Per-format benchmark: size, held-out top-1, batch-1 latency (p50/p95), batch-32 throughput, peak memory.

    python export/benchmark.py [--checkpoint RUN/best.pt] [--threads 2]

Every format gets the same preprocessed arrays and thread count. Batch-1 latency is timed after warm-up in
interleaved rounds (every format in turn, several times), so a slow spell on a shared machine falls on all formats
alike and the ratios between them stay meaningful. Each row also gives the effective GFLOP/s (2 x multiply-adds per
image / time), next to ONNX Runtime's own fp32 MatMul rate on the same threads: how close a format is to what this
CPU can do. Writes benchmark.md, benchmark.json and benchmark.png.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.errors import run_cli
from core.memory import in_use_mb
from export.common import add_max_images_flag, exported, format_label
from export.quantize import THROUGHPUT_BATCH, batch_throughput
from export.runtime import session_options
from export.validate import cycled_logits, runner, torch_runner
from training.runs import write_json
from training.summary import stats


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


def warm_up(run, x: np.ndarray, calls: int = 5) -> None:
    one = np.ascontiguousarray(x[:1])
    for _ in range(calls):
        run(one)


def time_interleaved(runs: dict[str, Callable], x: np.ndarray, n: int, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Batch-1 latency of every format: `rounds` rounds, each timing every format `n / rounds` times in turn; the
    median and 95th percentile of all its calls. Each turn starts with one untimed call, because the previous
    format's thread pool may still be spinning on the cores."""
    one = np.ascontiguousarray(x[:1])
    per = max(1, -(-n // rounds))
    lat: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            run(one)
            for _ in range(per):
                t = time.perf_counter()
                run(one)
                lat[name].append(1e3 * (time.perf_counter() - t))
    return {k: {"p50_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95))} for k, v in lat.items()}


def macs_per_image(model: torch.nn.Module, x: np.ndarray) -> int | None:
    """Multiply-adds of one forward pass at the benchmark's (square) input size, counted as training/summary.py
    counts them; None if nothing can be counted."""
    try:
        macs = stats(model.eval(), x.shape[1], x.shape[2])[2]
    except Exception:  # a module torchinfo cannot trace: the benchmark still runs, without GFLOP/s
        return None
    return int(macs) or None


def fp32_gemm_gflops(threads: int, n: int = 1024, calls: int = 10) -> float:
    """ONNX Runtime's fp32 MatMul rate (n x n x n, best of `calls`) with the formats' own session settings: the
    yardstick for the effective GFLOP/s of the fp32 formats (their convolutions run on the same kernels)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.random((n, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    feed = {"x": rng.random((n, n), dtype=np.float32)}
    sess.run(None, feed)
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


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
    images, threads and batch size) skips recomputing those; batch-1 latency is always measured here.

    Formats are loaded one after another (peak memory = what loading one and warming it up at batch 1 added),
    stay loaded, and are then timed together by time_interleaved."""
    torch.set_num_threads(threads)
    macs = macs_per_image(model, x)
    formats = {
        "pytorch": (ckpt_path, lambda: torch_runner(model.eval())),
        **{k: (p, (lambda p=p: runner(p, threads))) for k, p in paths.items()},
    }
    known = known or {}
    missing = [f for f in formats if known.get(f, {}).get("accuracy") is None]
    truth = y  # unlabelled images (-1) are scored against PyTorch's prediction once it is known: agreement
    rows, loaded = [], {}
    for name, (path, make) in formats.items():
        gc.collect()
        mem = PeakMemory()
        run = loaded[name] = make()
        warm_up(run, x)
        row = {
            "format": name,
            "file": path.name,
            "size_mb": path.stat().st_size / 2**20,
            "call_batch": call_batch(path),
        }
        row["peak_mem_growth_mb"] = mem.stop()  # load + batch-1 inference: what a deployed process holds
        given = known.get(name, {})
        accuracy = given.get("accuracy")
        if accuracy is None or (name == "pytorch" and missing and (y < 0).any()):
            pred = cycled_logits(run, x, (THROUGHPUT_BATCH,)).argmax(1)
            if name == "pytorch":
                truth = np.where(y >= 0, y, pred)
            if accuracy is None:
                accuracy = float(100 * (pred == truth).mean())
        row["accuracy"] = accuracy
        row["img_per_s"], row["img_per_s_from"] = given.get("img_per_s"), "validation"
        if row["img_per_s"] is None:
            row["img_per_s"], row["img_per_s_from"] = batch_throughput(run, x), "benchmark"
        rows.append(row)
    latency = time_interleaved(loaded, x, runs)
    del loaded
    for row in rows:
        row.update(latency[row["format"]], threads=threads, macs=macs)
        row["gflops_b1"] = 2e-6 * macs / row["p50_ms"] if macs else None
        row["gflops_b32"] = 2e-9 * macs * row["img_per_s"] if macs else None
        print(f"  {row['format']:<19} {row['p50_ms']:8.2f} ms p50  {row['img_per_s']:8.1f} img/s", flush=True)
    return rows


def call_batch(path: Path) -> int | None:
    """The fixed batch of a phone program (.pte, .tflite); None where one call takes any batch."""
    if path.suffix == ".pte":
        from export.to_executorch import pte_batch

        return pte_batch(path)
    if path.suffix == ".tflite":
        from export.to_litert import tflite_batch

        return tflite_batch(path)
    return None


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["format"] == "onnx_fp32"), rows[0])
    eager = next((r for r in rows if r["format"] == "pytorch"), rows[0])
    lines = [
        "| format | file | size MB | held-out top-1 | p50 ms (b1) | p95 ms (b1) | b1 speed-up vs eager | "
        "img/s (b32) | b32 vs ORT fp32 | GFLOP/s b1 / b32 | peak memory growth MB (load + b1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = f"{r['gflops_b1']:.0f} / {r['gflops_b32']:.0f}" if r.get("gflops_b1") else "-"
        lines.append(
            f"| {format_label(r['format'])} | {r['file']} | {r['size_mb']:.2f} | {r['accuracy']:.2f} % | "
            f"{r['p50_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {eager['p50_ms'] / r['p50_ms']:.2f}x | {r['img_per_s']:.1f}{_calls(r)} | "
            f"{r['img_per_s'] / base['img_per_s']:.2f}x | {flops} | {r['peak_mem_growth_mb']:.0f} |"
        )
    return "\n".join(lines)


def _calls(r: dict) -> str:
    """A batch-32 figure of a program with a fixed smaller batch is that many calls: the table says so."""
    b = r.get("call_batch")
    return f" ({THROUGHPUT_BATCH // b} calls of batch {b})" if b and b < THROUGHPUT_BATCH else ""


def plot(rows: list[dict], path: Path) -> None:
    from training.plots import pyplot

    plt = pyplot()
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


def write_outputs(rows: list[dict], out: Path, threads: int) -> str:
    """benchmark.md/.json/.png for `rows`, headed by the machine and the fp32 MatMul yardstick on `threads`."""
    device, gemm_gflops = device_line(threads), fp32_gemm_gflops(threads)
    yardstick = (
        f"Yardstick: ONNX Runtime's fp32 MatMul (1024³) on the same threads runs at {gemm_gflops:.0f} GFLOP/s; "
        "an fp32 format's effective GFLOP/s (2 x multiply-adds / time) near it means that format is at what this "
        "CPU can do. INT8 formats are counted in the same fp32-equivalent operations.\n\n"
    )
    md = f"# Benchmark\n\n{device}\n\n{yardstick}{table(rows)}\n"
    (out / "benchmark.md").write_text(md)
    write_json(out / "benchmark.json", {"device": device, "fp32_gemm_gflops": gemm_gflops, "rows": rows})
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
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per format (in 5 interleaved rounds)")
    add_max_images_flag(p, "held-out images for accuracy")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    model, path, d, paths, held, _ = exported(args.checkpoint, args.export_dir, args.max_images)
    rows = benchmark(model, path, paths, held.x, held.y, args.threads, args.runs)
    print(write_outputs(rows, d, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
