"""The shared toy run is reused across test sessions only while the code that builds it is unchanged."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest
from conftest import build_key, built_once


def _tree(root: Path) -> Path:
    for rel, text in {"core/a.py": "A = 1\n", "training/sub/b.py": "B = 1\n", "export/c.py": "C = 1\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "docs").mkdir()
    (root / "docs/notes.md").write_text("notes\n")
    return root


def cache_config(home: Path) -> SimpleNamespace:
    """A stand-in for pytest's config whose cache plugin keeps its folders under `home`."""

    def mkdir(name: str) -> Path:
        (home / name).mkdir(parents=True, exist_ok=True)
        return home / name

    return SimpleNamespace(cache=SimpleNamespace(mkdir=mkdir))


def test_the_build_key_follows_the_code_that_builds_and_where_it_is_written(tmp_path):
    root, also, home = _tree(tmp_path / "repo"), tmp_path / "conftest.py", tmp_path / "cache"
    also.write_text("X = 1\n")
    key = build_key(home, root, also)
    assert build_key(home, root, also) == key
    (root / "docs/notes.md").write_text("other notes\n")
    assert build_key(home, root, also) == key, "a file outside core/, training/, export/ changed the key"
    assert build_key(tmp_path / "moved", root, also) != key, "a build written elsewhere (its data paths) kept the key"
    keys = {key}
    for change in (
        lambda: (root / "training/sub/b.py").write_text("B = 2\n"),
        lambda: also.write_text("X = 2\n"),
        lambda: (root / "export/d.py").write_text("D = 1\n"),
        lambda: (root / "core/a.py").rename(root / "core/a2.py"),
    ):
        change()
        keys.add(build_key(home, root, also))
    assert len(keys) == 5, "a change to the code that builds the toy run kept an old key"


def test_built_once_reuses_one_build_per_key_and_hands_out_private_copies(tmp_path, tmp_path_factory, monkeypatch):
    home = tmp_path / "cache"
    config = cache_config(home)
    builds: list[Path] = []

    def build(root: Path) -> None:
        builds.append(root)
        (root / "model.txt").write_text(f"build {len(builds)}\n")

    monkeypatch.setattr(conftest, "build_key", lambda home: "k1")
    first = built_once(config, tmp_path_factory, "toy", build)
    (first / "model.txt").write_text("changed by a test\n")
    second = built_once(config, tmp_path_factory, "toy", build)  # a later session of the same code
    assert len(builds) == 1 and first != second
    assert (second / "model.txt").read_text() == "build 1\n", "a test's write reached the shared build"

    monkeypatch.setattr(conftest, "build_key", lambda home: "k2")
    third = built_once(config, tmp_path_factory, "toy", build)
    assert len(builds) == 2 and (third / "model.txt").read_text() == "build 2\n"
    assert sorted(p.name for p in (home / "toy-builds").iterdir() if not p.name.endswith(".lock")) == [
        "toy-k2",
        "toy-k2.done",
    ], "the build of the old key was kept"


def test_a_failed_build_is_not_reused(tmp_path, tmp_path_factory, monkeypatch):
    config = cache_config(tmp_path / "cache")
    monkeypatch.setattr(conftest, "build_key", lambda home: "k1")

    def broken(root: Path) -> None:
        (root / "half.txt").write_text("half\n")
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError):
        built_once(config, tmp_path_factory, "toy", broken)
    made = built_once(config, tmp_path_factory, "toy", lambda root: (root / "whole.txt").write_text("whole\n"))
    assert sorted(p.name for p in made.iterdir()) == ["whole.txt"]
