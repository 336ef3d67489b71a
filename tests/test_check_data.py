"""Dataset health check: leakage, conflicting labels, empty classes, imbalance; CLI, JSON, and train.py's use."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from core.errors import run_cli
from tests.conftest import class_image, train_argv
from training import check_data, train


def split_folder(root, counts=None):
    """train/val/test layout; counts per class for train (val/test get 3 each)."""
    rng = np.random.default_rng(1)
    counts = counts or {"circle": 6, "stripes": 6}
    for split in ("train", "val", "test"):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 3):
                class_image(c, rng).save(root / split / c / f"{i}.png")
    return root


def test_clean_folder_has_no_problems(tmp_path):
    r = check_data.check_data(str(split_folder(tmp_path / "d")))
    assert r.problems == [] and r.splits["train"] == {"circle": 6, "stripes": 6}
    assert "no problems found" in r.table()


def test_leakage_conflicts_duplicates_empty_class_and_imbalance(tmp_path):
    root = split_folder(tmp_path / "d", {"circle": 32, "stripes": 2})
    shutil.copy(root / "train/circle/0.png", root / "test/circle/leak.png")  # leaked into test
    shutil.copy(root / "train/circle/1.png", root / "train/stripes/mislabeled.png")  # same image, two labels
    shutil.copy(root / "train/circle/2.png", root / "train/circle/copy.png")  # plain duplicate
    (root / "val/empty").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train/circle/tiny.png")
    r = check_data.check_data(str(root))
    found = {f.check: f for f in r.findings}
    assert found["duplicate across splits"].level == "error" and found["duplicate across splits"].count == 1
    assert found["duplicate across splits"].examples == ["train:circle/0.png = test:circle/leak.png"]
    assert found["conflicting labels"].count == 1
    assert found["duplicate within split"].count == 2  # copy.png and mislabeled.png are extra copies
    assert found["empty class folder"].examples == ["val/empty"]
    assert found["class imbalance"].level == "warning"
    assert found["tiny image"].count == 1
    d = r.to_dict()
    assert d["errors"] >= 3 and json.loads(json.dumps(d))["findings"]


def test_cli_table_json_and_strict(tmp_path, capsys):
    root = split_folder(tmp_path / "d")
    assert run_cli(check_data.main, ["--data", str(root), "--json", str(tmp_path / "h.json"), "--strict"]) == 0
    (root / "train/circle/bad.png").write_bytes(b"not a png")
    assert run_cli(check_data.main, ["--data", str(root), "--json", str(tmp_path / "h.json")]) == 0
    out = capsys.readouterr().out
    assert "unreadable file" in out and "error" in out
    assert json.loads((tmp_path / "h.json").read_text())["errors"] == 1
    assert run_cli(check_data.main, ["--data", str(root), "--strict"]) == 1
    assert run_cli(check_data.main, ["--data", str(tmp_path / "missing")]) == 2


def test_builtin_dataset_is_checked_too():
    r = check_data.check_data("digits")
    assert sum(sum(c.values()) for c in r.splits.values()) == 1797
    assert {f.check for f in r.findings} >= {"tiny image"}  # 8x8 digits are tiny, and it says so


def test_train_runs_the_check_first_and_strict_data_stops_it(workdir, capsys):
    root = split_folder(workdir / "d")
    shutil.copy(root / "train/circle/0.png", root / "val/circle/leak.png")
    assert run_cli(train.main, train_argv(root, strict_data=True, name="s")) == 2
    assert "--strict-data" in capsys.readouterr().err
    assert not (workdir / "artifacts/runs/s").exists()
    assert run_cli(train.main, train_argv(root, name="ok")) == 0
    assert "duplicate across splits" in capsys.readouterr().out
    health = json.loads((workdir / "artifacts/runs/ok/data_health.json").read_text())
    assert health["errors"] == 1
