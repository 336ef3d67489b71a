"""Shared fixtures: tiny generated datasets and an isolated working folder (never downloads anything)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("circle", "stripes", "blank")

# registry models whose per-model tests take seconds each (measured: VGG ~9 s for the ONNX/TorchScript parity
# check): marked slow, so `pytest -m "not slow and not browser"` stays a quick developer loop; CI runs them all
HEAVY_MODELS = {
    "alexnet",
    "cyclemlp_b1",
    "darknet53",
    "densenet121",
    "efficientnet_b0",
    "googlenet",
    "inception_v3",
    "mixer_s16",
    "regnet_y_400mf",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "vgg11",
    "vgg11_bn",
    "vgg16",
    "vgg16_bn",
    "vit_b_16",
    "wide_resnet50_2",
    "xception",
}


def every_model() -> list:
    """Every registered model as a test parameter, the heavy ones marked slow."""
    from core.models import list_models

    return [pytest.param(m, marks=pytest.mark.slow) if m in HEAVY_MODELS else m for m in list_models()]


def class_image(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """Learnable synthetic classes: a bright disc, vertical stripes, or flat noise."""
    a = rng.normal(60, 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        a[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] += 150
    elif kind == "stripes":
        a[:, (xx[0] // 4) % 2 == 0] += 150
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run inside a fresh folder so artifacts/ is private to the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_folder(root: Path, per_class: int = 10, odd_files: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(c, rng).save(root / c / f"{i:03d}.png")
    if odd_files:
        class_image("circle", rng).convert("L").save(root / "circle" / "gray.png")
        rgba = class_image("stripes", rng).convert("RGBA")
        rgba.putalpha(200)
        rgba.save(root / "stripes" / "rgba.png")
        buf = io.BytesIO()
        class_image("blank", rng, 200).save(buf, "JPEG")  # header intact, pixel data cut: fails at decode
        (root / "blank" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 5])
        (root / "blank" / "notes.jpg").write_text("this is not an image")
    return root


def train_argv(data=None, *extra: str, **options) -> list[str]:
    """training/train.py arguments for a test run: 32 px, batch 8, no loader workers, no progress bar; with `data`,
    also cnn_small from scratch for 1 epoch. `extra` strings are appended as given; keywords replace or add options
    (`name="r"` -> --name r, `deterministic=True` -> --deterministic, `image_size=None` drops the option)."""
    opts = {"data": str(data), "mode": "scratch", "model": "cnn_small", "epochs": 1} if data is not None else {}
    opts |= {"image_size": 32, "batch_size": 8, "workers": 0, "no_progress": True, **options}
    argv: list[str] = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv + list(extra)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def _train_and_export(root: Path) -> None:
    """In `root`: generated folders, a 4-epoch cnn_small run `m` and its full export (relaxed INT8 budget: a toy
    model's INT8 accuracy is not the point here)."""
    from core.errors import run_cli
    from export import to_onnx
    from training import train

    old = os.getcwd()
    os.chdir(root)
    try:
        make_folder(root / "data", per_class=12, odd_files=False)
        assert run_cli(train.main, train_argv(root / "data", epochs=4, lr=0.01, name="m")) == 0
        argv = ["--checkpoint", "artifacts/runs/m/best.pt", "--calib-images", "24", "--threads", "1"]
        argv += ["--min-agreement", "90", "--max-drop", "10", "--max-class-drop", "30"]
        argv += ["--embed-preprocessing", "--executorch-int8", "--litert-int8"]
        assert run_cli(to_onnx.main, argv) == 0
    finally:
        os.chdir(old)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build` makes once per test session. Under pytest-xdist the first worker to ask builds it, under a
    lock, in the session's shared temp folder (the others wait or find it done) and every worker gets its own copy,
    so a test that writes beside it never races a test on the other worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: its own temp folder is the session's
        root = tmp_path_factory.mktemp(name)
        build(root)
        return root
    from filelock import FileLock

    worker_root = tmp_path_factory.getbasetemp()

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", "run")  # never a folder of an earlier session (--basetemp)
    shared, done = worker_root.parent / f"{name}-{run_id}", worker_root.parent / f"{name}-{run_id}.done"
    with FileLock(f"{shared}.lock"):
        if not done.is_file():
            shutil.rmtree(shared, ignore_errors=True)  # a half-built folder of a worker whose build failed
            shared.mkdir()
            build(shared)
            done.touch()
    own = worker_root / name
    shutil.copytree(shared, own, symlinks=True)
    return own


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> Path:
    """One tiny trained run (cnn_small on generated folders) with its full export, shared by the export, demo,
    consumer, ExecuTorch, LiteRT and corpus tests."""
    return built_once(tmp_path_factory, "exp", _train_and_export) / "artifacts/runs/m"


@pytest.fixture(scope="session")
def trained_run(exported_run: Path) -> Path:
    """The same run, for tests that read only its checkpoint."""
    return exported_run
