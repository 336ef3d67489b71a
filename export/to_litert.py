"""LiteRT `.tflite` (formerly TensorFlow Lite), converted by Google's `litert-torch`: the maintained path from
PyTorch to the Android/iOS LiteRT runtime (what Ultralytics' `format="litert"` uses).

    python export/to_litert.py [--checkpoint RUN/best.pt] [--out DIR]

`litert_torch.convert` captures the model with torch.export at batch 1 (NCHW float32 input, as the spec's
preprocessing produces it; logits out) and lowers it to a LiteRT flatbuffer, which the runtime runs through its
XNNPACK CPU delegate. The model spec travels inside the file as a flatbuffer metadata entry named `model_spec`
(the spec's JSON as UTF-8 bytes): an app reads it with any flatbuffer reader of the LiteRT schema, `read_tflite_spec`
here. The file is written atomically.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_write
from core.checkpoint import Checkpoint
from core.errors import UserError, first_line, run_cli
from core.spec import ModelSpec
from export.common import pt2e_quantized, standalone_inputs, standalone_parser

SPEC_METADATA = "model_spec"
INSTALL = "pip install -r requirements.txt (it installs litert-torch)"


def _litert_torch():
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its per-pass progress lines would flood the export log
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # and the converter's C++ INFO lines
    try:
        import litert_torch
    except ImportError:
        raise UserError(f"LiteRT export needs the litert-torch package: {INSTALL}; or pass --no-litert") from None
    return litert_torch


def example_input(spec: ModelSpec) -> torch.Tensor:
    return torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)


def with_spec(flatbuffer: bytes, spec: ModelSpec) -> bytes:
    """The model with the spec added as the metadata entry `model_spec` (an existing one is replaced)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) != SPEC_METADATA]
    buf = schema.BufferT()
    buf.data = np.frombuffer(spec.to_json().encode(), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = SPEC_METADATA, len(model.buffers) - 1
    model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _name(n: bytes | str | None) -> str:
    return n.decode() if isinstance(n, bytes) else (n or "")


def _convert(model: torch.nn.Module, spec: ModelSpec, quant_config=None) -> bytes:
    litert_torch = _litert_torch()
    try:
        edge = litert_torch.convert(model, (example_input(spec),), quant_config=quant_config)
        return with_spec(edge.model_content(), spec)
    except UserError:
        raise
    except Exception as e:  # torch.export, StableHLO lowering and the LiteRT converter raise many types
        raise UserError(f"LiteRT conversion of {spec.arch} failed: {first_line(e)}") from None


def export_litert(model: torch.nn.Module, ck: Checkpoint, path: Path) -> dict:
    """Write `path` (.tflite, fp32, batch 1) with the spec inside."""
    atomic_write(path, _convert(model.eval(), ck.spec))
    return {"batch": 1, "size_mb": round(path.stat().st_size / 2**20, 2)}


def quantize_litert(
    model: torch.nn.Module,
    ck: Checkpoint,
    path: Path,
    calib: np.ndarray,
    select_x: np.ndarray,
    select_y: np.ndarray,
    budget,
    threads: int = 2,
) -> dict:
    """INT8 .tflite under the export's accuracy budget: pt2e with litert-torch's quantizer (INT8 activations,
    symmetric per-channel INT8 weights), calibrated on training images, judged on the validation images that
    choose ONNX INT8 (never on the test split). Written to `path` only if it fits; the figures either way."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    from export.gates import judge_candidate

    path.unlink(missing_ok=True)  # never leave a stale INT8 file beside a new fp32 one
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    try:
        captured = torch.export.export(model.eval(), (example_input(ck.spec),)).module()
        converted = pt2e_quantized(captured, quantizer, calib, fold_quantize=False)
    except Exception as e:  # the pt2e flow raises many types; the user gets one line
        raise UserError(f"LiteRT INT8 quantization of {ck.spec.arch} failed: {first_line(e)}") from None
    data = _convert(converted, ck.spec, QuantConfig(pt2e_quantizer=quantizer))
    return judge_candidate(
        model,
        path,
        lambda p: atomic_write(p, data),
        lambda p: tflite_runner(p, threads),
        select_x,
        select_y,
        budget,
        "pt2e-LiteRT-S8-pc",
    )


def _flatbuffer(path: Path):
    from ai_edge_litert import schema_py_generated as schema

    try:
        data = path.read_bytes()
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ValueError("no TFL3 file identifier")
        return schema.Model.GetRootAs(data, 0)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    except Exception as e:
        raise UserError(f"{path}: not a LiteRT/TFLite model ({first_line(e)})") from None


def read_tflite_spec(path: Path) -> ModelSpec:
    """The spec carried inside a .tflite written by export_litert."""
    model = _flatbuffer(path)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if _name(entry.Name()) == SPEC_METADATA:
            raw = model.Buffers(entry.Buffer()).DataAsNumpy()
            if isinstance(raw, np.ndarray):
                return ModelSpec.from_json(raw.tobytes().decode())
    raise UserError(f"{path}: LiteRT model without our '{SPEC_METADATA}' metadata; export it with export/to_onnx.py")


def tflite_batch(path: Path) -> int:
    """The batch of the model's input (1 for our export: larger batches run image by image)."""
    model = _flatbuffer(path)
    graph = model.Subgraphs(0)
    return max(1, int(graph.Tensors(graph.Inputs(0)).Shape(0)))


def tflite_runner(path: Path, threads: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch -> logits through the LiteRT interpreter (XNNPACK delegate), one model-sized batch at a time
    (batch 1 for our export), inputs made contiguous float32."""
    from ai_edge_litert.interpreter import Interpreter

    _flatbuffer(path)  # a foreign or broken file is refused in one line, not by the C++ loader's log
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
    except Exception as e:
        raise UserError(f"{path}: LiteRT cannot load it ({first_line(e)})") from None
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    cap = max(1, int(inp["shape"][0]))
    quant_in, dequant_out = _quantizer(inp), _dequantizer(out)

    def call(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], quant_in(x))
        interp.invoke()
        return dequant_out(interp.get_tensor(out["index"]))

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if tuple(x.shape[1:]) != tuple(inp["shape"][1:]):
            raise UserError(f"{path}: expects input {[int(d) for d in inp['shape']]}, got {list(x.shape)}")
        return np.concatenate([call(x[i : i + cap]) for i in range(0, len(x), cap)])

    return run


def _quantizer(detail: dict) -> Callable[[np.ndarray], np.ndarray]:
    """float32 -> the input tensor's type: an INT8 model from pt2e takes int8 input with the scale and zero point
    in its tensor details (q = round(x / scale) + zero_point, clipped), as a phone app must feed it too."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return lambda x: x
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return lambda x: np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantizer(detail: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The output tensor back to float32 logits ((q - zero_point) * scale for a quantized output)."""
    if np.dtype(detail["dtype"]) == np.float32:
        return lambda y: y.copy()
    scale, zero = detail["quantization"]
    return lambda y: (y.astype(np.float32) - zero) * np.float32(scale)


def get_args_parser() -> argparse.ArgumentParser:
    return standalone_parser("Export a checkpoint to a LiteRT .tflite model (litert-torch).")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    model, ck, folder = standalone_inputs(args)
    out = folder / "model.tflite"
    info = export_litert(model, ck, out)
    print(f"wrote {out} ({info['size_mb']:.2f} MB, batch 1, spec inside as metadata '{SPEC_METADATA}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
