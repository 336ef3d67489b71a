"""The one call into torch.onnx.export, for both exporters; used by export/ and by training's feature cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def torch_to_onnx(
    model: nn.Module,
    x: torch.Tensor,
    out: Path,
    axes: dict[int, str],
    opset: int,
    dynamo: bool,
    input_name: str = "input",
    output_name: str = "logits",
) -> None:
    """Export `model(x)` with the input dims in `axes` dynamic (output batch follows); no checks, no cleanup."""
    if dynamo:  # torch.export-based: symbolic dims, opset >= 18
        dims = {k: torch.export.Dim(v, min=1, max=4096) for k, v in axes.items()}
        specific = {
            "dynamic_shapes": {"x": dims},
            "opset_version": max(opset, 18),
            "external_data": False,
            "verbose": False,
        }
    else:  # TorchScript-based
        specific = {
            "dynamic_axes": {input_name: axes, output_name: {0: axes.get(0, "batch")}},
            "opset_version": opset,
            "do_constant_folding": True,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(out), input_names=[input_name], output_names=[output_name], dynamo=dynamo, **specific
        )


def simplified(path: Path):
    """onnxsim's simplification of the ONNX file at `path` (folds the "same" padding into the convolutions, among
    others): what the export ships, so what --int8-aware training must quantize too for the same INT8 numbers.
    Raises ValueError if onnxsim cannot validate its result."""
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise ValueError("onnxsim could not validate the simplified model")
    return model
