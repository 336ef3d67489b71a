"""The one ONNX Runtime static-quantization call, shared by the export's INT8 search and by training that
must see the export's INT8 numbers (--int8-aware): same scheme, same calibration, same ranges."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)


@dataclass(frozen=True)
class QConfig:
    fmt: str = "QDQ"
    activations: str = "U8"
    per_channel: bool = True
    calibration: str = "MinMax"
    reduce_range: bool = False

    @property
    def name(self) -> str:
        return f"{self.fmt}-{self.activations}S8-{'pc' if self.per_channel else 'pt'}-{self.calibration}" + (
            "-rr" if self.reduce_range else ""
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
) -> Path:
    name = _input_name(src)
    cache = {"calibration_cache_path": cache_dir / f"ranges-{cfg.calibration}.json"} if cache_dir and _CACHE_OK else {}
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
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name
