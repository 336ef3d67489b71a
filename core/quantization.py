"""The one ONNX Runtime static-quantization call, shared by the export's INT8 search and by training that
must see the export's INT8 numbers (--int8-aware): same scheme, same calibration, same ranges."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from core.int8_correction import correct_bias, equalize, float_output, u8_pointwise, widen_depthwise


@dataclass(frozen=True)
class QConfig:
    fmt: str = "QDQ"
    activations: str = "U8"
    per_channel: bool = True
    calibration: str = "MinMax"
    reduce_range: bool = False
    corrected: bool = False  # equalize, full-range depthwise weights, bias correction (core/int8_correction.py)
    u8_pointwise: bool = False  # corrected only: 8-bit uint8 weights for dense convolutions (no int16 saturation)

    def __post_init__(self) -> None:
        if self.u8_pointwise and not (self.corrected and self.fmt == "QDQ" and self.activations == "U8"):
            raise ValueError("u8_pointwise is a step of the corrected QDQ pipeline with U8 activations")

    @property
    def name(self) -> str:
        return (
            f"{self.fmt}-{self.activations}S8-{'pc' if self.per_channel else 'pt'}-{self.calibration}"
            + ("-rr" if self.reduce_range else "")
            + ("+corrected" if self.corrected else "")
            + ("+u8pw" if self.u8_pointwise else "")
        )


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str, batch: int = 16) -> None:
        self.batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


# Recent onnxruntime releases can reuse calibration ranges from a JSON cache. The ranges depend on the model, the
# data and the calibration method only, so every candidate of one method shares a single calibration pass.
_CACHE_OK = "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_one(
    src: Path,
    out: Path,
    calib: np.ndarray,
    cfg: QConfig,
    exclude: list[str] | None = None,
    cache_dir: Path | None = None,
    threads: int = 2,
) -> Path:
    """Quantize `src` to `out` with one configuration; `corrected` wraps ORT's call in core/int8_correction.py's
    steps (equalize the fp32 graph first, widen depthwise weights and correct biases after)."""
    if not cfg.corrected:
        return _quantize_static(src, out, calib, cfg, exclude, cache_dir)
    fp = onnx.load(str(src))
    eq = equalize(fp, calib, threads)
    eq_path = out.with_name(out.stem + ".equalized.onnx")
    onnx.save(eq, str(eq_path))
    try:
        _quantize_static(eq_path, out, calib, cfg, exclude, cache_dir, cache_tag="-equalized")
    finally:
        eq_path.unlink(missing_ok=True)
    q = onnx.load(str(out))
    float_output(q)
    widen_depthwise(q, eq)
    if cfg.u8_pointwise:
        u8_pointwise(q, eq)
    correct_bias(q, eq, calib, threads, reference=fp)
    onnx.save(q, str(out))
    return out


def _quantize_static(
    src: Path,
    out: Path,
    calib: np.ndarray,
    cfg: QConfig,
    exclude: list[str] | None,
    cache_dir: Path | None,
    cache_tag: str = "",
) -> Path:
    name = _input_name(src)
    cache = (
        {"calibration_cache_path": cache_dir / f"ranges-{cfg.calibration}{cache_tag}.json"}
        if cache_dir and _CACHE_OK
        else {}
    )
    quantize_static(
        str(src),
        str(out),
        Reader(calib, name),
        quant_format=getattr(QuantFormat, cfg.fmt),
        activation_type=QuantType.QUInt8 if cfg.activations == "U8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=cfg.per_channel,
        reduce_range=cfg.reduce_range,
        calibrate_method=getattr(CalibrationMethod, cfg.calibration),
        nodes_to_exclude=exclude or [],
        extra_options={"ActivationSymmetric": cfg.activations == "S8"},
        **cache,
    )
    return out


def _input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name
