"""A consumer written only from the README's contract ("What a consumer must do"): numpy, Pillow and
onnxruntime, no import from this project. It is what a phone app or a server in another codebase would do, and
the tests hold our own eval paths to it (tests/test_consumer.py).

    python tools/consumer.py artifacts/runs/latest/export/model.onnx cell.jpg [more images] [--topk 3]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def read_spec(session: ort.InferenceSession) -> dict:
    """The model spec: the JSON string stored under `model_spec` in the ONNX metadata."""
    return json.loads(session.get_modelmeta().custom_metadata_map["model_spec"])


def decode(path: str) -> Image.Image:
    """1. Full-size decode of the first frame, 2. EXIF orientation applied, 3. 16-bit scaled (not clipped) to 8
    bits, transparency composited on white."""
    im = Image.open(path)
    im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max(initial=0) > 255):
        im = Image.fromarray(np.clip(np.rint(np.asarray(im, np.float64) / 257.0), 0, 255).astype(np.uint8))
    if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        gray = im.mode == "LA"
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        im = im.convert("L" if gray else "RGB")
    return im


def to_input(im: Image.Image, spec: dict) -> np.ndarray:
    """4. colour ("rgb"; "gray"; "gray3" = gray replicated to 3 channels), 5. resize with the spec's filter:
    "squash" straight to image_size², "center" shorter side to resize_size then a centred image_size² crop
    (longer side int(resize_size * long / short), offsets rounded), 6. x / 255, minus mean, over std, per
    channel, 7. float32 NCHW."""
    im = im.convert("RGB" if spec["color"] == "rgb" and im.mode != "L" else "L")
    size, filt = spec["image_size"], FILTERS[spec["interpolation"]]
    if spec["crop"] == "squash":
        im = im.resize((size, size), filt)
    else:
        w, h, r = *im.size, spec["resize_size"]
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), filt)
        left, top = round((nw - size) / 2), round((nh - size) / 2)
        im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], len(spec["mean"]), axis=2)
    a = (a - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None], np.float32)


def probabilities(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=3)
    args = p.parse_args(argv)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    spec = read_spec(session)
    for path in args.images:
        prob = probabilities(session, to_input(decode(path), spec))
        top = np.argsort(-prob)[: args.topk]
        print(path, " ".join(f"{spec['class_names'][i]}={prob[i]:.4f}" for i in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
