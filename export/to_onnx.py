"""One-shot export: ONNX fp32 -> simplify (re-verified) -> INT8 under a budget -> .ort -> TorchScript ->
ExecuTorch .pte -> LiteRT .tflite -> validation on real held-out images -> benchmark. Everything lands in <run>/export/.

    python export/to_onnx.py                           # artifacts/runs/latest/best.pt (or pretrained Lite0)
    python export/to_onnx.py --checkpoint RUN/best.pt --embed-preprocessing --search full
    python export/to_onnx.py --no-int8 --no-benchmark   # flags skip steps
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from core.checkpoint import file_sha256, load_model
from core.errors import UserError, run_cli
from export import onnx_io, quantize, validate
from export.benchmark import benchmark, write_outputs
from export.common import (
    INT8,
    add_max_images_flag,
    data_for,
    default_checkpoint,
    existing_artifacts,
    output_dir,
    selection_for,
)
from export.gates import budget_from
from export.to_executorch import export_executorch, quantize_executorch
from export.to_litert import export_litert, quantize_litert
from export.to_torchscript import export_torchscript
from training.runs import write_json


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint or run folder (default artifacts/runs/latest/best.pt)")
    p.add_argument("--out", help="output folder (default <run>/export)")
    p.add_argument("--opset", type=int, default=onnx_io.DEFAULT_OPSET)
    p.add_argument("--dynamo", action="store_true", help="use torch.export-based exporter (default: TorchScript)")
    p.add_argument("--dynamic-size", action="store_true", help="dynamic height/width too (default: batch only)")
    p.add_argument(
        "--embed-preprocessing",
        action="store_true",
        help="also write model.uint8.onnx: uint8 NHWC input, normalisation inside the graph",
    )
    add_max_images_flag(p, "held-out images for validation")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every runtime")
    skips = {"ort": "skip the ort step (the INT8 search then judges candidates as .onnx only)"}
    for flag in ("simplify", "int8", "ort", "torchscript", "executorch", "litert", "validate", "benchmark"):
        p.add_argument(f"--no-{flag}", action="store_true", help=skips.get(flag, f"skip the {flag} step"))
    p.add_argument(
        "--executorch-int8",
        action="store_true",
        help="also try model.int8.pte (pt2e, XNNPACK quantizer) under the same budget (~90 s for Lite0 at 300 px)",
    )
    p.add_argument(
        "--litert-int8",
        action="store_true",
        help="also try model.int8.tflite (pt2e, litert-torch quantizer) under the same budget",
    )
    quantize.add_budget_args(p)
    return p


def mobile_int8(runtime: str, fp32_file: str, result: dict) -> dict:
    """One line for an INT8 .pte/.tflite candidate judged on the validation images that choose ONNX INT8."""
    verdict = "written" if result["fits"] else f"REFUSED (outside budget; {fp32_file}, fp32, is the {runtime} artifact)"
    print(
        f"{runtime} INT8 ({result['config']}) on the validation images: agreement {result['agreement']:.2f} %, "
        f"drop {result['drop']:+.2f} pt, worst class {result['worst_class_drop']:.2f} pt -> {verdict}"
    )
    return result


def phone_step(summary: dict, failed: list[str], name: str, path: Path, export, model, ck) -> bool:
    """`export(model, ck, path)` for a phone format (and its INT8 twin removed first: never a stale file beside a
    new model). One that cannot be made for this model (an op torch.export or the converter cannot take) is
    reported in one line and skipped: the other formats are still written, validated and benchmarked, and the
    export ends non-zero naming it."""
    for stale in (path, path.with_name(path.stem + ".int8" + path.suffix)):
        stale.unlink(missing_ok=True)
    try:
        summary[name] = export(model, ck, path)
        return True
    except UserError as e:
        print(f"error: {e} -> {path.name} NOT written; the other formats continue (--no-{name} skips this step)")
        summary[name] = {"error": str(e)}
        failed.append(path.name)
        return False


def export_fp32(model, ck, ck_path: Path, out: Path, args, probe) -> tuple[Path, dict]:
    raw = onnx_io.export_onnx(model, ck.spec, out / "model.raw.onnx", args.opset, args.dynamic_size, dynamo=args.dynamo)
    meta = {
        "source_checkpoint": ck_path.name,
        "source_sha256": file_sha256(ck_path),
        "metrics": ck.metrics,
        "input": f"float32 NCHW [batch, {ck.spec.in_channels}, {ck.spec.image_size}, {ck.spec.image_size}]",
        "opset": args.opset,
    }
    final = out / "model.onnx"
    info: dict = {}
    if args.no_simplify:
        shutil.copyfile(raw, final)
    else:
        info = onnx_io.simplify(raw, final, probe)
        print(f"simplified {info['nodes_before']} -> {info['nodes_after']} nodes; batch 1/3/8 re-checked")
    onnx_io.set_metadata(final, ck.spec, {**meta, "precision": "fp32"})
    raw.unlink()
    if args.embed_preprocessing:
        u8 = onnx_io.export_onnx(
            model, ck.spec, out / "model.uint8.onnx", args.opset, args.dynamic_size, True, args.dynamo
        )
        onnx_io.set_metadata(
            u8,
            ck.spec,
            {
                **meta,
                "precision": "fp32",
                "input": "uint8 NHWC [batch, S, S, C], C = 1 for gray specs else 3, already resized/cropped to S",
            },
        )
    return final, {"meta": meta, "simplify": info}


class Stages:
    """Wall time per step, for the summary line and export.json (where does an export spend its minutes?)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now

    def line(self) -> str:
        return ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.no_int8:
        quantize.check_budget(args)  # before anything is written
    stages = Stages()
    t0 = stages.t0
    ck_path = default_checkpoint(args.checkpoint)
    model, ck = load_model(ck_path)
    calib, held, desc = data_for(ck, 0 if args.no_int8 else args.calib_images, args.max_images)
    select = None if args.no_int8 else selection_for(ck, args.max_images)
    sel = select[0] if select else None
    out = output_dir(ck_path, args.out)  # only once the inputs are known to be usable
    print(f"exporting {ck_path} -> {out}/  (held-out: {desc})")
    stages.done("load")
    fp32, info = export_fp32(model, ck, ck_path, out, args, held.x[:1])
    stages.done("onnx")
    summary = {"fp32": fp32.name, **info}
    chosen = fp32
    if not args.no_int8:
        int8 = out / "model.int8.onnx"
        int8.unlink(missing_ok=True)  # never leave a stale INT8 model beside a new fp32 one
        qrep = quantize.run_search(fp32, int8, calib.x, select[0], args, select[1], ck.args)
        write_json(out / "quantization.json", qrep)
        (out / "quantization.md").write_text(quantize.search_table(qrep) + "\n")
        summary["int8"], summary["int8_forced"] = qrep["chosen"], qrep["forced"]
        if qrep["chosen"]:
            onnx_io.set_metadata(
                int8,
                ck.spec,
                {**info["meta"], "precision": "int8", "quant_config": qrep["chosen"], "forced": qrep["forced"]},
            )
            chosen = int8
        stages.done("int8 search")
    if not args.no_ort:
        for stale in ("model.ort", "model.int8.ort"):
            (out / stale).unlink(missing_ok=True)
        onnx_io.to_ort_format(chosen, out / chosen.name.replace(".onnx", ".ort"))
    if not args.no_torchscript:
        export_torchscript(model, ck, out)
    stages.done("ort+torchscript")
    failed: list[str] = []
    if not args.no_executorch:
        made = phone_step(summary, failed, "executorch", out / "model.pte", export_executorch, model, ck)
        if made and args.executorch_int8 and not args.no_int8:
            r = quantize_executorch(model, ck, out / "model.int8.pte", calib.x, sel.x, sel.y, budget_from(args))
            summary["executorch_int8"] = mobile_int8("ExecuTorch", "model.pte", r)
        stages.done("executorch")
    if not args.no_litert:
        made = phone_step(summary, failed, "litert", out / "model.tflite", export_litert, model, ck)
        if made and args.litert_int8 and not args.no_int8:
            r = quantize_litert(
                model, ck, out / "model.int8.tflite", calib.x, sel.x, sel.y, budget_from(args), args.threads
            )
            summary["litert_int8"] = mobile_int8("LiteRT", "model.tflite", r)
        stages.done("litert")
    paths = existing_artifacts(out)
    ok, known = True, {}
    if not args.no_validate:
        print("validation against the PyTorch checkpoint:")
        rep = validate.validate(
            model,
            held,
            paths,
            budget_from(args),
            args.threads,
            desc,
        )
        validate.write_report(rep, out)
        # --force wrote an INT8 model that misses its budget on purpose: its gate stays FAIL in the report, but only
        # the fp32 gates decide the exit code
        ok = all(r["passed"] or (args.force and r["artifact"] in INT8) for r in rep["artifacts"])
        if ok and not rep["passed"]:
            print("WARNING: --force: the INT8 artifacts FAIL their accuracy budget (see report.md); fp32 gates passed")
        if not ok:
            hint = int8_failure_hint(rep, ck.args, desc)
            if hint:
                print(hint)
        known = validate.known_figures(rep)
        stages.done("validate")
    if not args.no_benchmark:
        print("benchmark:")
        rows = benchmark(model, ck_path, paths, held.x, held.y, args.threads, 50, known)
        print(write_outputs(rows, out, args.threads))
        stages.done("benchmark")
    total = round(time.perf_counter() - t0, 1)
    write_json(out / "export.json", {**summary, "seconds": total, "stage_seconds": stages.seconds})
    for p in sorted(out.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            print(f"  {p.name:<22} {p.stat().st_size / 2**20:8.2f} MB")
    int8_refused = not args.no_int8 and not summary.get("int8")
    verdict = (
        f"FAILED: {', '.join(failed)} not written"
        if failed
        else "FAILED validation"
        if not ok
        else "INT8 REFUSED (outside budget)"
        if int8_refused
        else "passed, with INT8 FORCED outside its budget"
        if summary.get("int8_forced")
        else "passed"
    )
    print(f"export {verdict} in {total:.0f} s ({stages.line()}) -> {out}")
    return 1 if failed or not ok else 3 if int8_refused else 0


def int8_failure_hint(rep: dict, run: dict | None, desc: str) -> str | None:
    """What to do when the only failing gates are INT8 ones: the model chosen on the validation images missed its
    budget on the held-out images (a split-to-split gap, not a broken export); None when an fp32 gate failed."""
    failing = [r for r in rep["artifacts"] if not r["passed"]]
    if not failing or any(r["artifact"] not in INT8 for r in failing):
        return None
    worst = min(failing, key=lambda r: r["agreement"])
    retrain = quantize.training_hint(run)
    return (
        f"INT8 chosen on the validation images misses its budget on {desc} ({worst['artifact']}: "
        f"{worst['agreement']:.1f} % top-1 agreement, drop {worst['drop']:+.1f} pt); the fp32 formats passed. next: "
        + retrain
        + ("or " if retrain else "")
        + "export with --no-int8 to ship fp32 only (report.md shows every gate)"
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
