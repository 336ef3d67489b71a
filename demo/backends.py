"""What the demo serves: discovered models, their backends loaded lazily and cached per process, and
fair timing (one decode + one preprocessing shared by every backend)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from core.checkpoint import load_checkpoint
from core.errors import UserError
from core.images import load_image
from core.preprocess import model_view, normalize
from core.spec import ModelSpec
from export.common import EXPORT_FILES
from export.runtime import OnnxClassifier, top_k

BACKENDS = (
    "pytorch",
    "torchscript",
    "onnx_fp32",
    "onnx_int8",
    "executorch",
    "executorch_int8",
    "litert",
    "litert_int8",
)
PHONE = ("executorch", "litert")  # the phone runtimes, timed after ONNX Runtime
FILES = {b: EXPORT_FILES[b] for b in BACKENDS if b in EXPORT_FILES}  # backend -> file in the export folder


@dataclass
class ServedModel:
    name: str
    checkpoint: Path | None
    export_dir: Path | None
    spec: ModelSpec
    metrics: dict = field(default_factory=dict)
    onnx_only: Path | None = None  # a bare .onnx given with --model

    def backends(self) -> list[str]:
        if self.onnx_only:
            return ["onnx_int8" if ".int8" in self.onnx_only.name else "onnx_fp32"]
        have = ["pytorch"] if self.checkpoint else []
        return have + [b for b, f in FILES.items() if self.export_dir and (self.export_dir / f).is_file()]

    @cached_property
    def caveats(self) -> dict[str, str]:
        """backend -> why its answers deserve less trust: an INT8 model written with --force although it missed
        the accuracy budget (its quantization report says so, with the measured agreement). Read once per process,
        like the backends themselves, not on every request."""
        if not (self.export_dir and (self.export_dir / FILES["onnx_int8"]).is_file()):
            return {}
        try:
            rep = json.loads((self.export_dir / "quantization.json").read_text())
        except (OSError, ValueError):
            return {}
        if not rep.get("forced"):
            return {}
        row = next((r for r in reversed(rep.get("candidates", [])) if r.get("config") == rep.get("chosen")), {})
        figures = (
            f": {row['agreement']:.1f} % top-1 agreement with fp32 on held-out images" if "agreement" in row else ""
        )
        return {"onnx_int8": f"onnx_int8 was written with --force outside its accuracy budget{figures}"}

    @cached_property
    def int8_refusal(self) -> tuple[str, str] | None:
        """(one line, the search table) when the export refused INT8: the demo shows why the column is empty."""
        if not self.export_dir or (self.export_dir / FILES["onnx_int8"]).is_file():
            return None
        try:
            rep = json.loads((self.export_dir / "quantization.json").read_text())
            table = (self.export_dir / "quantization.md").read_text()
        except (OSError, ValueError):
            return None
        if rep.get("chosen"):
            return None
        rows = [r for r in rep.get("candidates", []) if "agreement" in r]
        best = max(rows, key=lambda r: r["agreement"], default=None)
        b = rep.get("budget", {})
        line = "INT8 refused: no configuration stays inside the accuracy budget" + (
            f" (best {best['config']}: {best['agreement']:.1f} % top-1 agreement, {best['drop']:+.1f} pt; "
            f"budget >= {b.get('min_agreement', '?')} %, drop <= {b.get('max_drop', '?')} pt)"
            if best
            else ""
        )
        return line, table

    @cached_property
    def phone_int8(self) -> dict[str, str]:
        """backend -> why an INT8 .pte/.tflite column is empty: the export judged it and refused it (with its
        figures), or the export never tried (it is opt-in: each attempt costs a minute or more on a CPU)."""
        try:
            summary = json.loads((self.export_dir / "export.json").read_text()) if self.export_dir else {}
        except (OSError, ValueError):
            return {}
        out = {}
        for backend, flag in (("executorch_int8", "--executorch-int8"), ("litert_int8", "--litert-int8")):
            r = summary.get(backend)
            if isinstance(r, dict) and not r.get("fits") and "agreement" in r:
                out[backend] = (
                    f"INT8 refused: {r['agreement']:.1f} % top-1 agreement with fp32, {r['drop']:+.1f} pt "
                    f"({r.get('config', '')}) on the validation images"
                )
            elif backend.split("_")[0] in summary and r is None:
                out[backend] = f"not exported (opt-in: export/to_onnx.py {flag})"
        return out

    def path(self, backend: str) -> Path:
        if self.onnx_only:
            return self.onnx_only
        return self.checkpoint if backend == "pytorch" else self.export_dir / FILES[backend]


class Runners:
    """(model, backend) -> a callable on preprocessed batches; loaded on first use, thread-safe."""

    def __init__(self, threads: int = 2) -> None:
        self.threads, self._cache, self._lock = threads, {}, threading.Lock()

    def get(self, m: ServedModel, backend: str) -> Callable[[np.ndarray], np.ndarray]:
        key = (m.name, backend)
        with self._lock:
            if key not in self._cache:
                run = self._load(m, backend)
                run(np.zeros((1, m.spec.in_channels, m.spec.image_size, m.spec.image_size), np.float32))  # warm
                self._cache[key] = run
            return self._cache[key]

    def _load(self, m: ServedModel, backend: str):
        if backend not in m.backends():
            raise UserError(f"backend {backend} is not available for {m.name}; choose from {m.backends()}")
        path = m.path(backend)
        if backend.startswith("onnx"):
            clf = OnnxClassifier(path, self.threads, spec=m.spec, idle_spin=False)
            return clf.logits
        if backend.startswith("executorch"):
            from export.to_executorch import pte_runner

            return pte_runner(path)
        if backend.startswith("litert"):
            from export.to_litert import tflite_runner

            return tflite_runner(path, self.threads)
        import torch

        from export.validate import torch_runner

        torch.set_num_threads(self.threads)
        if backend == "pytorch":
            from core.checkpoint import load_model

            module = load_model(path)[0]
        else:
            from export.to_torchscript import load_torchscript

            module = load_torchscript(path)[0]
        return torch_runner(module)


@dataclass
class Prediction:
    backend: str
    top: list[tuple[str, float]]
    inference_ms: float


def prepare(source, spec: ModelSpec):
    """Decode once (defensively) and preprocess once: (network input [1,C,S,S], crop preview, ms)."""
    t = time.perf_counter()
    im = load_image(source)
    view = model_view(im, spec)
    x = normalize(view, spec)[None]  # the same view: resize once
    return x, view, 1e3 * (time.perf_counter() - t)


def timing_order(backends: list[str]) -> list[str]:
    """ONNX Runtime backends first, then the phone runtimes, then the PyTorch ones. After a PyTorch call its
    OpenMP threads keep spinning for a while and the next ONNX Runtime call measured up to 2-3x slower; the other
    way round is clean because the demo's ONNX Runtime sessions stop spinning when a run returns. Each backend's
    time is its own."""
    return sorted(backends, key=lambda b: 0 if b.startswith("onnx") else 1 if b.startswith(PHONE) else 2)


def run_backends(runners: Runners, m: ServedModel, backends: list[str], x: np.ndarray, k: int) -> list[Prediction]:
    """Every backend on the same input, in timing_order, results in the order asked."""
    out = []
    for b in timing_order(backends):
        run = runners.get(m, b)
        t = time.perf_counter()
        logits = run(x)[0]
        out.append(Prediction(b, top_k(logits, m.spec.class_names, k), 1e3 * (time.perf_counter() - t)))
    return sorted(out, key=lambda p: backends.index(p.backend))


def discover(root: Path, explicit: list[str] | None) -> dict[str, ServedModel]:
    """Every run under root/runs with a best.pt (and its export/), or the models named by --model."""
    found: dict[str, ServedModel] = {}
    sources = (
        [Path(p) for p in explicit]
        if explicit
        else sorted(
            (p for p in (root / "runs").glob("*/best.pt") if p.parent.name != "latest" and not p.parent.is_symlink()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
    )
    for src in sources:
        m = served_from_path(src)
        found[m.name] = m
    if explicit:
        return found
    # the dropdown opens on the first entry: the newest run that has an export (it has every backend to compare),
    # not a newer run that only PyTorch can serve
    exported = [n for n, m in found.items() if m.export_dir]
    return {n: found[n] for n in exported[:1] + [n for n in found if n not in exported[:1]]}


def served_from_path(p: Path) -> ServedModel:
    if not p.exists():
        raise UserError(f"--model {p} does not exist")
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").is_file() else p
    if p.suffix in (".onnx",):
        clf = OnnxClassifier(p)
        return ServedModel(p.stem, None, None, clf.spec, onnx_only=p)
    if p.suffix == ".pte":
        from export.to_executorch import read_pte_spec

        return ServedModel(p.stem, None, p.parent, read_pte_spec(p))
    if p.suffix == ".tflite":
        from export.to_litert import read_tflite_spec

        return ServedModel(p.stem, None, p.parent, read_tflite_spec(p))
    if p.suffix in (".pt", ".ptl") and p.name.startswith("model"):
        from export.to_torchscript import load_torchscript

        _, spec_json = load_torchscript(p)
        if not spec_json:
            raise UserError(f"{p}: no model spec inside; serve its checkpoint or .onnx instead")
        return ServedModel(p.stem, None, p.parent, ModelSpec.from_json(spec_json))
    ck = load_checkpoint(p)
    export = p.parent / "export"
    return ServedModel(p.parent.name, p, export if export.is_dir() else None, ck.spec, ck.metrics)
