"""A deployment runtime that needs only numpy, Pillow and onnxruntime.

    from export.runtime import OnnxClassifier
    clf = OnnxClassifier("model.onnx")
    clf.classify("photo.jpg", topk=5)   # [("daisy", 0.91), ...]

The model spec is read from the ONNX file's metadata, so preprocessing (EXIF, mode conversion, resize,
crop, normalisation) is exactly the training eval transform; nothing is typed twice.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UserError
from core.images import load_image
from core.preprocess import preprocess
from core.spec import ModelSpec

SPEC_KEY = "model_spec"


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse ONNX files whose external-data locations point outside their own folder."""
    import onnx

    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise UserError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    base = p.parent.resolve()
    for t in _all_tensors(model.graph):
        for entry in t.external_data:
            if entry.key == "location":
                target = (base / entry.value).resolve()
                if base not in target.parents and target != base:
                    raise UserError(f"{p}: refused, external data {entry.value!r} points outside {base}")


def _all_tensors(graph) -> list:
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.t.name:
                tensors.append(attr.t)
            for g in (attr.g, *attr.graphs):
                if g is not None and g.node:
                    tensors += _all_tensors(g)
    return tensors


def read_metadata(session) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def spec_from_metadata(meta: dict[str, str], path: str | os.PathLike) -> ModelSpec:
    if SPEC_KEY not in meta:
        raise UserError(
            f"{path}: ONNX file has no '{SPEC_KEY}' metadata; export it with export/to_onnx.py "
            "(or pass the model spec JSON explicitly)"
        )
    return ModelSpec.from_json(meta[SPEC_KEY])


def session_options(threads: int | None = None, idle_spin: bool = True):
    """CPU session settings shared by every session the project opens. Its threads busy-wait between the operators
    of a run (fast); `idle_spin=False` also stops them the moment a run returns, instead of spinning on for a while
    (ONNX Runtime's default): a process that runs other sessions or PyTorch next, or serves requests, keeps its
    cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    if not idle_spin:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def make_session(path: str | os.PathLike, threads: int | None = None, idle_spin: bool = True):
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such model file")
    if p.suffix == ".onnx":
        check_external_data(p)
    try:
        return ort.InferenceSession(str(p), session_options(threads, idle_spin), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"{p}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:120]})") from None


class OnnxClassifier:
    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        spec: ModelSpec | None = None,
        idle_spin: bool = True,
    ) -> None:
        self.path = Path(path)
        self.session = make_session(path, threads, idle_spin)
        self.metadata = read_metadata(self.session)
        self.spec = spec or spec_from_metadata(self.metadata, path)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]

    def preprocess(self, image: Any) -> np.ndarray:
        return preprocess(load_image(image), self.spec)

    def classify(self, image: Any, topk: int = 5) -> list[tuple[str, float]]:
        return self.classify_timed(image, topk)[0]

    def classify_timed(self, image: Any, topk: int = 5) -> tuple[list[tuple[str, float]], dict[str, float]]:
        """Top-k (label, probability) and the milliseconds spent decoding+preprocessing vs inferring."""
        t0 = time.perf_counter()
        x = self.preprocess(image)[None]
        t1 = time.perf_counter()
        logits = self.logits(x)[0]
        t2 = time.perf_counter()
        return top_k(logits, self.spec.class_names, topk), {
            "preprocess_ms": 1e3 * (t1 - t0),
            "inference_ms": 1e3 * (t2 - t1),
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def top_k(logits: np.ndarray, names: tuple[str, ...], k: int = 5) -> list[tuple[str, float]]:
    p = softmax(logits.astype(np.float64))
    idx = np.argsort(-p)[: max(1, min(k, len(names)))]
    return [(names[i], float(p[i])) for i in idx]
