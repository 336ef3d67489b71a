"""ONNX export, checking, simplification (re-verified), spec metadata, the .ort mobile format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from core.atomic import atomic_write
from core.errors import UserError
from core.onnx_export import simplified, torch_to_onnx
from core.spec import ModelSpec
from export.runtime import SPEC_KEY, make_session

DEFAULT_OPSET = 17  # the TorchScript exporter's best-tested opset; ORT quantization fully supports it


class EmbeddedPreprocessing(nn.Module):
    """uint8 NHWC input (already resized/cropped to image_size; C = 1 for gray specs, else 3) -> logits.

    The normalisation moves into the graph: what a phone app wants, as it hands over camera bytes.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(spec.std).view(1, -1, 1, 1) * 255.0))
        self.replicate = spec.color == "gray3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        if self.replicate:
            x = x.expand(-1, 3, -1, -1)
        return self.model((x - self.mean) * self.inv_std)


def export_onnx(
    model: nn.Module,
    spec: ModelSpec,
    path: Path,
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = False,
    uint8_input: bool = False,
    dynamo: bool = False,
) -> Path:
    model = model.eval()
    if dynamic_size and spec.arch.startswith("efficientnet_lite"):
        raise UserError(
            "--dynamic-size is not supported for EfficientNet-Lite: its TF 'same' padding depends on "
            "the input size; export at the spec's fixed size instead"
        )
    if uint8_input:
        model = EmbeddedPreprocessing(model, spec).eval()
        x = torch.zeros(1, spec.image_size, spec.image_size, spec.view_channels, dtype=torch.uint8)
        axes = {0: "batch", 1: "height", 2: "width"} if dynamic_size else {0: "batch"}
    else:
        x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
        axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tries = [True] if dynamo else [False, True]  # the TorchScript exporter first; torch.export-based as fallback
    errors = []
    for use_dynamo in tries:
        try:
            torch_to_onnx(model, x, tmp, axes, opset, use_dynamo)
            break
        except Exception as e:
            tmp.unlink(missing_ok=True)
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'} exporter: {str(e).splitlines()[0][:140]}")
    else:
        raise UserError(f"ONNX export failed at opset {opset} ({'; '.join(errors)}); try another --opset")
    if len(errors) == 1 and not dynamo:
        print(f"note: {errors[0]}; exported with the torch.export-based exporter instead")
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)
    return path


def set_metadata(path: Path, spec: ModelSpec, extra: dict[str, object]) -> None:
    m = onnx.load(str(path))
    props = {SPEC_KEY: spec.to_json(), **{k: json.dumps(v, default=str) for k, v in extra.items()}}
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "deployable-classifier"
    save_atomic(m, path)


def save_atomic(model: onnx.ModelProto, path: Path) -> None:
    atomic_write(path, model.SerializeToString())


RUN_BATCH = 32  # images per call: ORT's activations grow with the batch (a 300 px Lite0: ~14 MB per image)


def run_onnx(path: Path, x: np.ndarray, threads: int | None = None, batch: int = RUN_BATCH) -> np.ndarray:
    """First output of the model on x, run `batch` images at a time by one session (296 ELPV images in one call
    peaked at 4.2 GB; a validation split of a few thousand would not fit in memory). A model exported with a
    fixed batch size is fed chunks of exactly that size, the last one padded by repeating images."""
    sess = make_session(path, threads)
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.resize(chunk, (fixed, *chunk.shape[1:]))
        outs.append(sess.run(None, {inp.name: chunk})[0][:n])
    if not outs:  # no images: an empty batch of the output's shape
        return np.zeros([0] + [d if isinstance(d, int) else 0 for d in sess.get_outputs()[0].shape[1:]], np.float32)
    return np.concatenate(outs)


def simplify(path: Path, out: Path, probe: np.ndarray, atol: float = 1e-5) -> dict[str, object]:
    """onnxsim, then prove it changed nothing: same outputs, dynamic batch still works at 1, 3 and 8."""
    try:
        model = simplified(path)
    except ValueError as e:
        raise UserError(f"{e}; rerun with --no-simplify") from None
    save_atomic(model, out)
    report: dict[str, object] = {"batches": {}}
    for b in (1, 3, 8):
        x = np.resize(probe, (b, *probe.shape[1:])).astype(probe.dtype)
        ref, got = run_onnx(path, x), run_onnx(out, x)
        diff = float(np.abs(ref - got).max())
        report["batches"][str(b)] = {"shape": list(got.shape), "max_abs_diff": diff}
        if got.shape[0] != b or diff > atol:
            out.unlink(missing_ok=True)
            raise UserError(
                f"simplified model differs at batch {b} (shape {got.shape}, max diff {diff:.2e});"
                " kept the unsimplified model; rerun with --no-simplify"
            )
    report["nodes_before"] = len(onnx.load(str(path)).graph.node)
    report["nodes_after"] = len(model.graph.node)
    return report


def to_ort_format(path: Path, out: Path) -> Path:
    """ONNX Runtime's mobile format (what the onnxruntime-mobile packages load)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # EXTENDED fusions (Conv+activation, ...) are CPU-EP generic, so the file stays portable to ARM phones;
    # ENABLE_ALL would bake in x86 NCHWc layouts. BASIC measured 3.6x slower than .onnx on this CPU.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return out
