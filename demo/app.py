"""Gradio demo: every backend of every trained model side by side, on accuracy and latency.

    python demo/app.py                          # discovers artifacts/runs/*; none -> pretrained ImageNet Lite0
    python demo/app.py --model artifacts/runs/NAME --port 7860
    python demo/app.py --host 0.0.0.0 --max-file-mb 5 --queue-size 16

Uploads are untrusted: the file widget hands over the raw bytes (the webcam/paste widget a temp-file path)
without decoding them, and core.images decodes them with size/pixel caps checked first. Every event has an
api_name (see README for a gradio_client example).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from core.errors import UserError, run_cli
from core.images import ImageError
from demo.backends import (
    BACKENDS,
    Prediction,
    Runners,
    ServedModel,
    discover,
    prepare,
    run_backends,
    served_from_path,
)
from demo.bench import benchmark_plot, benchmark_rows
from demo.examples import example_files, imagenet_fallback
from training.runs import ARTIFACTS, RUNS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve trained models in the browser, every backend side by side.")
    p.add_argument("--model", action="append", help="run folder, checkpoint, .onnx or .pt (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it on the network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--max-file-mb", type=float, default=10.0, help="largest upload accepted")
    p.add_argument("--queue-size", type=int, default=32, help="waiting requests beyond this get 'queue full'")
    p.add_argument("--concurrency", type=int, default=2, help="predictions processed at once")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per backend")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=1000,
        help="sessions whose UI state is kept in memory (oldest evicted): bounds memory under many clients",
    )
    p.add_argument(
        "--cache-minutes",
        type=float,
        default=30.0,
        help="uploads and generated images are deleted after this long (and all of them at shutdown)",
    )
    return p


class Demo:
    def __init__(self, models: dict[str, ServedModel], threads: int) -> None:
        self.models, self.runners = models, Runners(threads)

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise gr.Error(f"unknown model {name!r}; choose from {list(self.models)}")
        return self.models[name]

    def predict(self, file: bytes | None, camera: str | None, name: str, backends: list[str], topk: float):
        """Top-k per backend, timings and the agreement badge (the crop preview is a separate, UI-only step so
        API clients do not pay for writing and downloading an image on every request)."""
        source = file if file is not None else camera  # b"" is an (empty) upload
        if source is None:
            raise gr.Error("upload an image first (or use the webcam/paste box)")
        m = self.model(name)
        chosen = [b for b in (backends or m.backends()) if b in m.backends()]
        if not chosen:
            raise gr.Error(f"none of {backends} is available for {name}; available: {m.backends()}")
        try:
            x, _, pre_ms = prepare(source, m.spec)
            preds = run_backends(self.runners, m, chosen, x, int(topk))
        except (ImageError, UserError) as e:
            raise gr.Error(str(e)) from None
        rows = [
            [p.backend, p.top[0][0], round(p.top[0][1], 4), round(pre_ms, 2), round(p.inference_ms, 2)] for p in preds
        ]
        return dict(preds[0].top), rows, agreement_badge(preds, m.caveats)

    def preview(self, file: bytes | None, camera: str | None, name: str):
        """The exact crop the network sees, enlarged for small inputs (digits, CIFAR) with sharp pixels."""
        source = file if file is not None else camera  # b"" is an (empty) upload
        if source is None:
            return None
        try:
            _, view, _ = prepare(source, self.model(name).spec)
        except (ImageError, UserError):
            return None  # predict() already showed the error
        scale = max(1, 224 // max(view.size))
        return np.asarray(view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST))

    def compare(self, file: bytes | None, name: str):
        """One image through every backend of the model: one Label and latency line per column."""
        m = self.model(name)
        if file is None:
            raise gr.Error("upload an image first")
        try:
            x, _, pre_ms = prepare(file, m.spec)
            preds = {p.backend: p for p in run_backends(self.runners, m, m.backends(), x, 5)}
        except (ImageError, UserError) as e:
            raise gr.Error(str(e)) from None
        caveats, out = m.caveats, []
        for b in BACKENDS:
            p = preds.get(b)
            out += [
                dict(p.top) if p else None,
                (f"preprocess {pre_ms:.2f} ms · inference {p.inference_ms:.2f} ms" if p else not_served(m, b))
                + (f" · ⚠️ {caveats[b]}" if p and b in caveats else ""),
            ]
        return out

    def benchmark(self, name: str, n: float, progress=gr.Progress()):  # noqa: B008 - gradio injects it
        """Held-out images through each backend, one request at a time (concurrency 1), warm."""
        m = self.model(name)
        try:
            rows = benchmark_rows(self.runners, m, int(n), progress)
        except UserError as e:
            raise gr.Error(str(e)) from None
        return rows, benchmark_plot(rows)

    def card(self, name: str) -> str:
        m = self.model(name)
        s = m.spec
        lines = [
            f"### {m.name}",
            f"- architecture: `{s.arch}` {s.arch_kwargs}",
            f"- classes ({s.num_classes}): {', '.join(s.class_names[:20])}{' …' if s.num_classes > 20 else ''}",
            f"- preprocessing: {s.color}, resize {s.resize_size} → {s.crop} {s.image_size}px, {s.interpolation},"
            f" mean {s.mean}, std {s.std}",
            f"- backends: {', '.join(m.backends())}",
            *(f"- ⚠️ {text}" for text in m.caveats.values()),
        ]
        if m.metrics.get("accuracy") is not None:
            bal = m.metrics.get("balanced_accuracy")
            lines.append(
                f"- {m.metrics.get('eval_split', 'held-out')} accuracy: {100 * m.metrics['accuracy']:.2f} %"
                + (f", balanced {100 * bal:.2f} % (mean of per-class accuracies)" if bal is not None else "")
            )
            per_class = m.metrics.get("per_class_accuracy") or {}
            if 1 < len(per_class) <= 20:
                lines.append(
                    "- per class: " + ", ".join(f"{c} {100 * v:.1f} %" for c, v in per_class.items() if v is not None)
                )
        if m.int8_refusal:
            lines += [f"- ⚠️ {m.int8_refusal[0]}", "", m.int8_refusal[1]]
        report = m.export_dir / "report.md" if m.export_dir else None
        if report and report.is_file():
            lines += ["", report.read_text()]
        return "\n".join(lines)


def not_served(m: ServedModel, backend: str) -> str:
    """Why a Compare column is empty: the INT8 search refused (with its best figures), or never exported."""
    if backend == "onnx_int8" and m.int8_refusal:
        return m.int8_refusal[0] + " (table in the Model card tab)"
    if backend in m.phone_int8:
        return m.phone_int8[backend]
    return "not exported"


def agreement_badge(preds: list[Prediction], caveats: dict[str, str]) -> str:
    """One line over the results: do the backends agree, and is any of them known to be outside its budget?"""
    tops = {p.top[0][0] for p in preds}
    badge = (
        f"✅ all backends agree on **{next(iter(tops))}**"
        if len(tops) == 1
        else "⚠️ backends disagree: " + ", ".join(f"{p.backend} → {p.top[0][0]}" for p in preds)
    )
    return badge + "".join(f"\n\n⚠️ {caveats[p.backend]}" for p in preds if p.backend in caveats)


def build_ui(app: Demo, cache_seconds: int = 1800) -> gr.Blocks:
    names = list(app.models)
    first = app.models[names[0]]
    # delete_cache: (how often to sweep, max age) for gradio's upload/output cache; also emptied at shutdown
    sweep = (max(10, cache_seconds // 2), cache_seconds)
    with gr.Blocks(title="Classifier demo: every backend side by side", delete_cache=sweep) as ui:
        gr.Markdown("# Image classifier — PyTorch vs TorchScript vs ONNX fp32 vs ONNX INT8")
        model = gr.Dropdown(names, value=names[0], label="model")
        with gr.Tab("Predict"):
            with gr.Row():
                with gr.Column():
                    # binary, not filepath: gradio 6's File(type="filepath") leaves an empty temp file per call
                    file = gr.File(label="image file", file_types=["image"], type="binary", elem_id="upload")
                    camera = gr.Image(
                        label="or webcam / paste", type="filepath", image_mode=None, sources=["webcam", "clipboard"]
                    )
                    backends = gr.CheckboxGroup(list(BACKENDS), value=first.backends(), label="backends")
                    topk = gr.Slider(1, 10, value=5, step=1, label="top-k")
                    go = gr.Button("Classify", variant="primary", elem_id="classify")
                with gr.Column():
                    label = gr.Label(label="prediction (first backend)", elem_id="label")
                    badge = gr.Markdown(elem_id="badge")
                    table = gr.Dataframe(
                        headers=["backend", "top-1", "prob", "preprocess ms", "inference ms"],
                        label="per backend",
                        interactive=False,
                    )
                    view = gr.Image(label="what the model sees (after resize/crop)", interactive=False)
            ex = example_files(first)
            if ex:
                gr.Examples([[str(p)] for p in ex], inputs=[file], label="held-out examples")
            go.click(
                app.predict, [file, camera, model, backends, topk], [label, table, badge], api_name="predict"
            ).success(app.preview, [file, camera, model], view, api_name=False)
        with gr.Tab("Compare"):
            cfile = gr.File(label="image file", file_types=["image"], type="binary", elem_id="compare-upload")
            cgo = gr.Button("Run every backend", variant="primary", elem_id="compare-go")
            outs = []
            with gr.Row():
                for b in BACKENDS:
                    with gr.Column(min_width=200):
                        outs.append(gr.Label(label=b, num_top_classes=3, elem_classes=["compare-label"]))
                        outs.append(gr.Markdown(elem_classes=["compare-time"]))
            cgo.click(app.compare, [cfile, model], outs, api_name="compare")
        with gr.Tab("Benchmark"):
            n = gr.Slider(8, 512, value=64, step=8, label="held-out images")
            bgo = gr.Button("Run benchmark", variant="primary")
            btable = gr.Dataframe(
                headers=["backend", "accuracy %", "agreement %", "p50 ms", "p95 ms", "img/s", "size MB"],
                interactive=False,
            )
            bplot = gr.Plot()
            bgo.click(
                app.benchmark,
                [model, n],
                [btable, bplot],
                api_name="benchmark",
                concurrency_limit=1,
                concurrency_id="timing",
            )
        with gr.Tab("Model card"):
            card = gr.Markdown(app.card(names[0]))
        model.change(app.card, model, card, api_name="model_card")
        model.change(lambda n: gr.CheckboxGroup(value=app.models[n].backends()), model, backends, api_name=False)
    return ui


def load_models(args: argparse.Namespace) -> dict[str, ServedModel]:
    models = discover(ARTIFACTS, args.model)
    if not models:
        print(f"no trained models under {RUNS}: serving the pretrained ImageNet EfficientNet-Lite0")
        models = {m.name: m for m in [served_from_path(imagenet_fallback())]}
    return models


def clear_cache(ui: gr.Blocks) -> int:
    """Delete every upload and generated file this app put in gradio's cache (and their emptied folders).
    Gradio does this in its server's shutdown hook, which is skipped when open browser/heartbeat connections
    keep the server thread from stopping within its 5 s; so the app does it itself on the way out."""
    removed = 0
    for files in ui.temp_file_sets:
        for f in list(files):
            p = Path(f)
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
                with contextlib.suppress(OSError):
                    p.parent.rmdir()  # the per-content hash folder, once empty
            files.discard(f)
    return removed


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (docker stop, systemd) takes the same clean path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if min(args.max_file_mb, args.queue_size, args.concurrency, args.cache_minutes, args.max_sessions) <= 0:
        raise UserError("--max-file-mb, --queue-size, --concurrency, --cache-minutes, --max-sessions must be positive")
    app = Demo(load_models(args), args.threads)
    ui = build_ui(app, int(args.cache_minutes * 60))
    ui.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    print(f"serving {len(app.models)} model(s): {', '.join(app.models)}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ui.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            show_error=True,
            max_file_size=int(args.max_file_mb * 1024 * 1024),
            enable_monitoring=False,
            ssr_mode=False,
            allowed_paths=[str(d) for d in {p.parent for m in app.models.values() for p in example_files(m)}],
            footer_links=["api"],
            # gradio keeps a ~100 KB copy of the UI config per session for 10,000 sessions by default: every
            # REST call without a session is a new one, so a public demo would grow by ~1 GB before evicting
            state_session_capacity=args.max_sessions,
        )
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e}); choose another --port") from None
    finally:
        ui.close(verbose=False)
        print(f"shut down; removed {clear_cache(ui)} cached upload/output files", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
