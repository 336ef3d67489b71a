"""Shared fixtures: tiny generated datasets and an isolated working folder (never downloads anything)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("circle", "stripes", "blank")


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


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny trained run (cnn_small on generated folders) shared by export and demo tests."""
    import os

    from core.errors import run_cli
    from training import train

    root = tmp_path_factory.mktemp("exp")
    old = os.getcwd()
    os.chdir(root)
    try:
        make_folder(root / "data", per_class=12, odd_files=False)
        argv = [
            "--data",
            str(root / "data"),
            "--mode",
            "scratch",
            "--model",
            "cnn_small",
            "--epochs",
            "4",
            "--lr",
            "0.01",
            "--name",
            "m",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--no-progress",
        ]
        assert run_cli(train.main, argv) == 0
    finally:
        os.chdir(old)
    return root / "artifacts/runs/m"


@pytest.fixture(scope="session")
def exported_run(trained_run: Path) -> Path:
    """trained_run plus its full export (relaxed INT8 budget: a 4-epoch toy model is not the point here)."""
    import os

    from core.errors import run_cli
    from export import to_onnx

    if not (trained_run / "export" / "report.json").is_file():
        old = os.getcwd()
        os.chdir(trained_run.parent.parent.parent)
        try:
            code = run_cli(
                to_onnx.main,
                [
                    "--checkpoint",
                    str(trained_run / "best.pt"),
                    "--calib-images",
                    "24",
                    "--threads",
                    "1",
                    "--min-agreement",
                    "90",
                    "--max-drop",
                    "10",
                    "--max-class-drop",
                    "30",
                    "--embed-preprocessing",
                ],
            )
        finally:
            os.chdir(old)
        assert code == 0
    return trained_run
