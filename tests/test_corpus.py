"""The malformed-input corpus (tools/malformed_corpus.py) through every consumer: the decoder, the
deployment runtime, predict.py, evaluate.py and the data check. Each file gets its expected answer
(a prediction, or a one-line error containing the expected words) within 1 s, and nothing dies.
The demo's share of the corpus is in test_demo.py (it needs the server)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import run_cli
from core.images import ImageError, load_image
from tools.malformed_corpus import BUILDERS, build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list:
    return build(tmp_path_factory.mktemp("corpus"))


def test_corpus_is_big_and_varied_enough(corpus):
    assert len(corpus) >= 25
    assert {c.expect for c, _ in corpus} == {"ok", "refuse"}
    sizes = {c.name: p.stat().st_size for c, p in corpus}
    assert sizes["declares_13k.png"] < 25_000 and sizes["bomb_20k.png"] < 100_000  # tiny files, huge claims


@pytest.mark.parametrize("case", [c for c, _ in BUILDERS], ids=[c.name for c, _ in BUILDERS])
def test_decoder_answers_every_file_fast(corpus, case):
    path = dict((c.name, p) for c, p in corpus)[case.name]
    t = time.perf_counter()
    if case.expect == "ok":
        im = load_image(path)
        assert im.mode in ("RGB", "L") and min(im.size) >= 1
    else:
        with pytest.raises(ImageError, match=case.match) as e:
            load_image(path)
        assert "\n" not in str(e.value) and path.name in str(e.value)
    assert time.perf_counter() - t < 1.0


def test_exif_and_frames_are_handled_as_documented(corpus):
    paths = {c.name: p for c, p in corpus}
    assert load_image(paths["exif_rotated.jpg"]).size == (40, 80)  # stored 80x40, orientation 6
    assert load_image(paths["animated.gif"]).size == (48, 48)
    assert load_image(paths["multipage.tif"]).size == (40, 30)
    lo, hi = load_image(paths["png16.png"]).getextrema()
    assert lo == 0 and hi == 255  # 16-bit range scaled, not clipped to white


MEMORY_PROBE = """
import resource, sys
from core.images import ImageError, load_image
load_image(sys.argv[2])  # warm up: imports, decoder tables
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image(sys.argv[1])
except ImageError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.parametrize("name", ["declares_13k.png", "bomb_20k.png"])
def test_bombs_cost_almost_no_memory(corpus, name):
    paths = {c.name: p for c, p in corpus}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(paths[name]), str(paths["progressive.jpg"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout) < 50.0  # MB of peak RSS added; a full 13k x 13k RGB decode would be ~500


def test_runtime_answers_every_file(corpus, exported_run):
    from export.runtime import OnnxClassifier

    clf = OnnxClassifier(exported_run / "export/model.onnx", threads=1)
    for case, path in corpus:
        t = time.perf_counter()
        if case.expect == "ok":
            top = clf.classify(path, topk=2)
            assert len(top) == 2 and top[0][0] in clf.spec.class_names, case.name
        else:
            with pytest.raises(ImageError, match=case.match):
                clf.classify(path)
        assert time.perf_counter() - t < 1.0, case.name


def test_predict_cli_answers_every_file(corpus, trained_run, tmp_path, capsys):
    from training import predict

    folder = next(iter(corpus))[1].parent
    out = tmp_path / "p.json"
    code = run_cli(predict.main, [str(folder), "--checkpoint", str(trained_run), "--json", str(out)])
    assert code == 1  # some files failed: non-zero, every file still answered
    results = {Path(r["file"]).name: r for r in json.loads(out.read_text())}
    for case, _ in corpus:
        r = results[case.name]
        if case.expect == "ok":
            assert len(r["top"]) == 3, case.name
        else:
            assert case.match in r["error"], (case.name, r)
    assert capsys.readouterr().out.count(": error: ") == sum(c.expect == "refuse" for c, _ in corpus)


@pytest.fixture
def polluted(corpus, tmp_path):
    """A 3-class ImageFolder (the training data's classes) with the whole corpus dropped into one class."""
    from tests.conftest import make_folder

    root = make_folder(tmp_path / "polluted", per_class=4, odd_files=False, seed=3)
    for _, p in corpus:
        if not p.name.startswith("oversized"):
            shutil.copy(p, root / "blank" / p.name)
    return root


def test_evaluate_skips_bad_files_and_counts_them(polluted, corpus, trained_run, tmp_path, capsys):
    from training import evaluate

    argv = ["--checkpoint", str(trained_run), "--data", str(polluted), "--workers", "0", "--out", str(tmp_path)]
    assert run_cli(evaluate.main, [*argv, "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    ok = sum(c.expect == "ok" for c, _ in corpus)
    refused = sum(c.expect == "refuse" for c, p in corpus if not p.name.startswith("oversized"))
    assert m["n"] == 12 + ok  # every decodable file evaluated
    assert m["skipped"] + m["unreadable_files"] == refused
    assert f"{refused} unreadable files skipped" in capsys.readouterr().out


def test_data_check_reports_the_corpus(polluted, corpus, capsys):
    from training import check_data

    r = check_data.check_data(str(polluted), workers=2)
    found = {f.check: f for f in r.findings}
    refused = sum(c.expect == "refuse" for c, p in corpus if not p.name.startswith("oversized"))
    assert found["unreadable file"].count == refused and found["unreadable file"].level == "error"
    assert found["EXIF-rotated"].count == 1 and found["multi-frame"].count == 2
    assert {"mode CMYK", "mode I;16", "mode P", "mode RGBA", "mode LA", "mode 1"} <= set(found)
    assert found["tiny image"].count == 1  # the 1x1
    assert r.splits["train"] and r.splits["val"]


def test_training_skips_every_bad_file_with_one_warning_line_each(polluted, corpus, tmp_path):
    """train.py as a user runs it on the polluted folder: exit 0, and stderr holds nothing but `warning: ...` lines
    (no file:line prefix, no echoed source line), one naming each file it skipped."""
    from tests.conftest import train_argv

    cmd = [sys.executable, str(ROOT / "training/train.py"), *train_argv(polluted)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), res.stderr[-2000:]
    refused = [p.name for c, p in corpus if c.expect == "refuse" and not p.name.startswith("oversized")]
    assert not [name for name in refused if not any(name in line and "skipping" in line for line in lines)]
