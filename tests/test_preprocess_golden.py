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
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPECS = {
    "center-bilinear-rgb": ModelSpec("m", ("a", "b"), image_size=32, resize_size=37, mean=IN_MEAN, std=IN_STD),
    "center-bicubic-rgb": ModelSpec(
        "m", ("a", "b"), image_size=48, resize_size=55, mean=IN_MEAN, std=IN_STD, interpolation="bicubic"
    ),
    "squash-gray3": ModelSpec(
        "m", ("a", "b"), image_size=40, resize_size=40, mean=(0.5,) * 3, std=(0.5,) * 3, crop="squash", color="gray3"
    ),
    "squash-gray": ModelSpec(
        "m", ("a", "b"), image_size=24, resize_size=24, mean=(0.4,), std=(0.2,), crop="squash", color="gray"
    ),
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
