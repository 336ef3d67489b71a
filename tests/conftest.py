"""Shared fixtures: tiny generated datasets and an isolated working folder (never downloads anything)."""

from __future__ import annotations

import io
import os
import shutil
import sys
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


# What the shared toy run depends on: the code that trains and exports it, this file, and the libraries that write its
# files. A cached build is reused only under the same key, so a change to any of them rebuilds it.
BUILD_SOURCES = ("core", "training", "export")
BUILD_LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "onnx",
    "onnxruntime",
    "onnxsim",
    "executorch",
    "litert-torch",
)


HERE = Path(__file__).resolve()


def build_key(home: Path, root: Path = HERE.parents[1], also: Path = HERE) -> str:
    """A digest of the folder `home` the build is written to (its checkpoint records the absolute path of its data
    there, so a moved checkout must not reuse it), the Python files under BUILD_SOURCES in `root`, the file `also`
    (this one), and the versions of Python and of BUILD_LIBRARIES."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256(f"{home.resolve()}\npython {sys.version}\n".encode())
    files = [f for d in BUILD_SOURCES for f in sorted((root / d).rglob("*.py"))] + [also]
    for f in files:
        digest.update(f.name.encode() if f == also else f.relative_to(root).as_posix().encode())
        digest.update(b"\0" + f.read_bytes() + b"\0")
    for lib in BUILD_LIBRARIES:
        try:
            digest.update(f"{lib}=={version(lib)}\n".encode())
        except PackageNotFoundError:
            digest.update(f"{lib} absent\n".encode())
    return digest.hexdigest()[:16]


def built_once(config, tmp_path_factory, name: str, build) -> Path:
    """A folder `build` makes once, and a private copy of it for the calling process (a test that writes beside it
    never races a test on the other xdist worker). The build lives in pytest's cache folder under build_key(), made
    under a file lock by the first process that asks (the other worker waits or finds it done), so the next test
    session of the same code reuses it: CI's browser session after the xdist session, a developer's next run.
    Builds of other keys are removed when a new one is made. Without pytest's cache plugin
    (`-p no:cacheprovider`) the build goes to the session's temp folders instead."""
    from filelock import FileLock

    cache = getattr(config, "cache", None)
    if cache is not None:
        home = cache.mkdir("toy-builds")
    else:  # the session's shared temp folder (xdist workers' basetemps are siblings under it)
        base = tmp_path_factory.getbasetemp()
        home = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    shared = home / f"{name}-{build_key(home)}"
    done = shared.with_name(shared.name + ".done")
    with FileLock(f"{shared}.lock"):
        if not done.is_file():
            for old in home.glob(f"{name}-*"):  # other keys' builds, and a half-built folder of a failed build
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                elif not old.name.startswith(shared.name):
                    old.unlink(missing_ok=True)
            shared.mkdir()
            build(shared)
            done.touch()
    own = tmp_path_factory.mktemp(name)
    shutil.copytree(shared, own, symlinks=True, dirs_exist_ok=True)
    return own


@pytest.fixture(scope="session")
def exported_run(request, tmp_path_factory) -> Path:
    """One tiny trained run (cnn_small on generated folders) with its full export, shared by the export, demo,
    consumer, ExecuTorch, LiteRT and corpus tests."""
    return built_once(request.config, tmp_path_factory, "exp", _train_and_export) / "artifacts/runs/m"


@pytest.fixture(scope="session")
def trained_run(exported_run: Path) -> Path:
    """The same run, for tests that read only its checkpoint."""
    return exported_run
