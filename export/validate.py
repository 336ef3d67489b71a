"""Prove each exported artifact is the trained model, on real held-out images.

    python export/validate.py [--checkpoint RUN/best.pt] [--export-dir RUN/export]

Every artifact runs the same preprocessed arrays as the PyTorch checkpoint, with batch sizes cycling
1, 7, 32 through the set. fp32 gates: |Δlogit| <= 1e-4 + 1e-4·|logit| everywhere and 100 % top-1
agreement. INT8 gates: the accuracy budget of export/gates.py. Writes report.json and report.md;
exits 1 if any gate fails.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.errors import run_cli
from export.common import INT8, Images, add_max_images_flag, exported, format_label
from export.gates import Budget, add_budget_flags, budget_from, compare, fits
from export.quantize import THROUGHPUT_BATCH
from export.runtime import make_session
from training.runs import write_json

ATOL, RTOL = 1e-4, 1e-4
BATCH_CYCLE = (1, 7, 32)


def runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    if path.suffix in (".onnx", ".ort"):
        sess = make_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if path.suffix == ".pte":
        from export.to_executorch import pte_runner, read_pte_spec

        read_pte_spec(path)  # a program without our spec is refused here, in one line
        return pte_runner(path)
    if path.suffix == ".tflite":
        from export.to_litert import read_tflite_spec, tflite_runner

        read_tflite_spec(path)  # a model without our spec is refused here, in one line
        return tflite_runner(path, threads)
    from export.to_torchscript import load_torchscript

    module, _ = load_torchscript(path)
    return torch_runner(module)


def torch_runner(module: Callable) -> Callable[[np.ndarray], np.ndarray]:
    @torch.inference_mode()  # the fastest eager inference PyTorch offers: the baseline every format is compared to
    def run(x: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(x)).float().numpy()

    return run


def cycled_logits(
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    sizes=BATCH_CYCLE,
    seconds: dict[int, list[float]] | None = None,
) -> np.ndarray:
    """Logits for every image, batch sizes cycling through `sizes`; `seconds` collects call times per batch size."""
    out, i, k = [], 0, 0
    while i < len(x):
        b = sizes[k % len(sizes)]
        xb = np.ascontiguousarray(x[i : i + b])
        t = time.perf_counter()
        out.append(run(xb))
        if seconds is not None:
            seconds.setdefault(len(xb), []).append(time.perf_counter() - t)
        i, k = i + b, k + 1
    return np.concatenate(out)


def throughput_from(seconds: dict[int, list[float]], batch: int = THROUGHPUT_BATCH) -> float | None:
    """Images/s at `batch` from the calls validation made anyway: the first call (warm-up) is dropped and the
    median of the rest taken; None when there were fewer than two further calls (benchmark then times its own)."""
    times = seconds.get(batch, [])[1:]
    return batch / float(np.median(times)) if len(times) >= 2 else None


def check_artifact(name: str, logits: np.ndarray, ref: np.ndarray, y: np.ndarray, budget: Budget) -> dict:
    diff = np.abs(logits - ref)
    stats = compare(ref, logits, y)
    row = {
        "artifact": name,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        **stats,
        "per_class_delta": per_class_delta(ref, logits, y),
    }
    if name in INT8:
        row["gate"] = "int8 budget"
        row["passed"] = fits(stats, budget)
    else:
        # no "|" in the text: report.md puts it in a table cell, where a pipe starts a new column
        row["gate"] = f"abs diff <= {ATOL:g} + {RTOL:g} x abs logit, 100 % agreement"
        row["passed"] = bool(np.all(diff <= ATOL + RTOL * np.abs(ref))) and stats["agreement"] == 100.0
    return row


def per_class_delta(ref: np.ndarray, logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    truth = np.where(y >= 0, y, ref.argmax(1))
    out = {}
    for c in np.unique(truth):
        m = truth == c
        out[str(int(c))] = float(100 * ((logits[m].argmax(1) == c).mean() - (ref[m].argmax(1) == c).mean()))
    return out


def validate(
    model: torch.nn.Module,
    held: Images,
    paths: dict[str, Path],
    budget: Budget,
    threads: int,
    description: str,
) -> dict:
    torch.set_num_threads(threads)
    ref_seconds: dict[int, list[float]] = {}
    ref = cycled_logits(torch_runner(model.eval()), held.x, (THROUGHPUT_BATCH,), ref_seconds)
    rows = []
    for name, path in paths.items():
        seconds: dict[int, list[float]] = {}
        logits = cycled_logits(runner(path, threads), held.x, BATCH_CYCLE, seconds)
        rows.append(
            {
                **check_artifact(name, logits, ref, held.y, budget),
                "file": path.name,
                "size_mb": path.stat().st_size / 2**20,
                "img_per_s": throughput_from(seconds),
            }
        )
        r = rows[-1]
        print(
            f"  {name:<19} max|d| {r['max_abs_diff']:.2e}  agree {r['agreement']:6.2f} %  acc {r['accuracy']:6.2f} %"
            f"  {'PASS' if r['passed'] else 'FAIL'}",
            flush=True,
        )
    return {
        "images": description,
        "n": len(held.y),
        "batch_sizes": list(BATCH_CYCLE),
        "pytorch_accuracy": rows[0]["fp32_accuracy"] if rows else None,
        "pytorch_img_per_s": throughput_from(ref_seconds),
        "threads": threads,
        "artifacts": rows,
        "passed": all(r["passed"] for r in rows),
    }


def report_markdown(rep: dict) -> str:
    lines = [
        f"# Export validation\n\nImages: {rep['images']} (n = {rep['n']}), batch sizes cycling "
        f"{rep['batch_sizes']}. PyTorch accuracy: {rep['pytorch_accuracy']:.2f} %.\n",
        "| artifact | file | size MB | max abs Δlogit | top-1 agreement | accuracy | Δ acc | gate | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["artifacts"]:
        lines.append(
            f"| {format_label(r['artifact'])} | {r['file']} | {r['size_mb']:.2f} | {r['max_abs_diff']:.2e} | "
            f"{r['agreement']:.2f} % | {r['accuracy']:.2f} % | {-r['drop']:+.2f} | {r['gate']} | "
            f"{'PASS' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def write_report(rep: dict, out: Path) -> None:
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(report_markdown(rep))


def known_figures(rep: dict) -> dict[str, dict]:
    """What the benchmark can reuse from a validation report: held-out top-1 and batch-32 throughput."""
    figures = {"pytorch": {"accuracy": rep["pytorch_accuracy"], "img_per_s": rep.get("pytorch_img_per_s")}}
    for r in rep["artifacts"]:
        figures[r["artifact"]] = {"accuracy": r["accuracy"], "img_per_s": r.get("img_per_s")}
    return figures


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Validate exported artifacts against the PyTorch checkpoint.")
    p.add_argument("--checkpoint", help="checkpoint or run folder (default artifacts/runs/latest/best.pt)")
    p.add_argument("--export-dir", type=Path, help="folder with model.onnx etc. (default <run>/export)")
    add_max_images_flag(p, "held-out images")
    p.add_argument("--threads", type=int, default=2)
    add_budget_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    budget = budget_from(args)
    model, _, d, paths, held, desc = exported(args.checkpoint, args.export_dir, args.max_images)
    rep = validate(model, held, paths, budget, args.threads, desc)
    write_report(rep, d)
    print(json.dumps({"passed": rep["passed"]}), f"-> {d}/report.md")
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
