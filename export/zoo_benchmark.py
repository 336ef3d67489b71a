"""Zoo benchmark: every registered architecture exported to ONNX fp32 and INT8, batch-1 latency and size.

    python export/zoo_benchmark.py --image-size 224 --out docs/zoo.md
    python export/zoo_benchmark.py --models resnet18 mobilenet_v2 efficientnet_lite0

Weights are random (this measures the formats, not accuracy); INT8 is ONNX Runtime static QDQ, U8
activations, S8 per-channel weights, calibrated on 8 crops of real photos after quant_pre_process.
Latency: median of --runs batch-1 runs after warm-up, --threads threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization.shape_inference import quant_pre_process

from core.errors import run_cli
from core.models import create_model, default_spec, get_entry, list_models
from core.quantization import QConfig, quantize_one
from export.benchmark import device_line
from export.common import sample_images
from export.onnx_io import export_onnx
from export.runtime import make_session


def latency_ms(path: Path, x: np.ndarray, threads: int, runs: int) -> float:
    sess = make_session(path, threads)
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(1e3 * (time.perf_counter() - t))
    return float(np.median(times))


def row(name: str, size: int, calib: np.ndarray, threads: int, runs: int, tmp: Path) -> str:
    entry = get_entry(name)
    size = entry.default_size if entry.extra.get("fixed_size") else max(size, entry.min_size)
    model = create_model(name, 1000, 3, size).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    spec = default_spec(name, [str(i) for i in range(1000)], image_size=size, crop="squash")
    fp32 = export_onnx(model, spec, tmp / f"{name}.onnx")
    x = calib[:1] if calib.shape[-1] == size else np.random.default_rng(0).normal(size=(1, 3, size, size))
    x = x.astype(np.float32)
    cal = calib if calib.shape[-1] == size else np.random.default_rng(1).normal(size=(8, 3, size, size))
    pre = tmp / f"{name}.pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # without it QDQ ResNet-18 ran 3.5x slower
    int8 = quantize_one(pre, tmp / f"{name}.int8.onnx", cal.astype(np.float32), QConfig())
    f_ms, q_ms = latency_ms(fp32, x, threads, runs), latency_ms(int8, x, threads, runs)
    f_mb, q_mb = fp32.stat().st_size / 2**20, int8.stat().st_size / 2**20
    return (
        f"| {name} | {size} | {params:.2f} | {f_mb:.1f} | {q_mb:.1f} | {f_ms:.2f} | {q_ms:.2f} | {f_ms / q_ms:.2f}x |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="default: the whole registry")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = p.parse_args(argv)
    names = args.models or list_models()
    torch.set_num_threads(args.threads)
    # 8 calibration images: weights are random, so only speed is measured, and MinMax calibration holds every
    # activation of every image in memory (wide_resnet50_2 at 224 px with 32 images exhausted 24 GB)
    crops = default_spec("resnet18", ["a"], image_size=args.image_size, crop="squash")  # ImageNet normalisation
    calib = sample_images(crops, 8, seed=1).x
    lines = [
        f"# Model zoo: ONNX fp32 vs INT8 at {args.image_size} px\n",
        device_line(args.threads) + "\n",
        "| model | input | params (M) | fp32 MB | INT8 MB | fp32 p50 ms (b1) | INT8 p50 ms (b1) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            try:
                line = row(name, args.image_size, calib, args.threads, args.runs, Path(d))
            except Exception as e:  # a model that cannot be benchmarked is a row, not the end of the table
                line = f"| {name} | | | | | | | failed: {str(e).splitlines()[0][:60]} |"
            lines.append(line)
            print(line, flush=True)
            for f in Path(d).iterdir():
                f.unlink()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
