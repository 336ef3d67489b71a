"""Golden test: the torch-free runtime preprocessing equals the training eval transform (<= 1/255)."""

import numpy as np
import pytest
from PIL import Image

from core.preprocess import preprocess
from core.spec import ModelSpec
from core.transforms import eval_transform

rng = np.random.default_rng(0)
IMAGES = {
    "landscape": Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)),
    "portrait": Image.fromarray(rng.integers(0, 256, (301, 97, 3), dtype=np.uint8)),
    "tiny": Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
    "gray": Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
    "square": Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
}
SPECS = {
    "center-bilinear-rgb": ModelSpec("m", ("a", "b"), 32, 37),
    "center-bicubic-rgb": ModelSpec("m", ("a", "b"), 48, 55, interpolation="bicubic"),
    "squash-gray3": ModelSpec("m", ("a", "b"), 40, 40, "squash", mean=(0.5,) * 3, std=(0.5,) * 3, color="gray3"),
    "squash-gray": ModelSpec("m", ("a", "b"), 24, 24, "squash", mean=(0.4,), std=(0.2,), color="gray"),
}


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("image_name", IMAGES)
def test_runtime_matches_training_eval_transform(spec_name, image_name):
    spec, im = SPECS[spec_name], IMAGES[image_name]
    ours = preprocess(im, spec)
    ref = eval_transform(spec)(im).numpy()
    assert ours.shape == ref.shape == (spec.in_channels, spec.image_size, spec.image_size)
    scale = 1 / (255 * min(spec.std))  # one 8-bit step after normalisation
    assert np.abs(ours - ref).max() <= scale


def test_rgba_through_both_paths_is_identical():
    from core.images import load_image

    rgba = Image.fromarray(rng.integers(0, 256, (50, 60, 4), dtype=np.uint8), "RGBA")
    spec = SPECS["center-bilinear-rgb"]
    im = load_image(rgba)
    assert np.abs(preprocess(im, spec) - eval_transform(spec)(im).numpy()).max() <= 1 / (255 * min(spec.std))


def _photo_jpeg(path, w, h):
    yy, xx = np.mgrid[:h, :w]
    a = np.stack([xx * 255 // w, yy * 255 // h, (xx // 7 + yy // 5) % 256], -1) + rng.normal(0, 10, (h, w, 3))
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return path


@pytest.mark.parametrize(("w", "h", "spec_name"), [(1024, 1024, "squash-gray3"), (1600, 1200, "center-bicubic-rgb")])
def test_large_jpeg_reduced_decode_is_shared_by_every_eval_path(tmp_path, w, h, spec_name):
    """The demo/runtime decode big JPEGs at reduced scale; training's eval loader must see the same pixels."""
    from core.images import load_image
    from core.preprocess import decode_size
    from export.runtime import OnnxClassifier
    from training.data import ImageDataset, Split

    spec = SPECS[spec_name]
    path = _photo_jpeg(tmp_path / "big.jpg", w, h)
    reduced = load_image(path, reduce_to=decode_size(spec))
    assert reduced.width < w and min(reduced.size) >= decode_size(spec)[0]  # really reduced, never too small
    runtime = OnnxClassifier.__new__(OnnxClassifier)  # preprocessing only: no session needed
    runtime.spec = spec
    ours = runtime.preprocess(str(path))
    ref, _ = ImageDataset(Split([path], [0]), eval_transform(spec), decode_size(spec))[0]
    step = 1 / (255 * min(spec.std))
    assert np.abs(ours - ref.numpy()).max() <= step  # runtime == training eval path
    full = eval_transform(spec)(load_image(path)).numpy()
    assert np.abs(ours - full).mean() <= 2 * step  # and close to a full-size decode (< 2 levels on average)
