"""Crash safety: SIGKILL training at many points (mid-step, mid-write, before a rename, between files);
every time last.pt loads, --resume cleans up and finishes with exactly the uninterrupted run's numbers."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import load_checkpoint
from tests.conftest import make_folder, train_argv

pytestmark = pytest.mark.slow  # real training processes killed and resumed: minutes

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
# (crash point, epoch --resume must restart at): 4 optimizer steps per epoch on this data.
KILL_POINTS = [
    ("step#6", 2),  # mid-epoch 2, nothing of epoch 2 saved
    ("write:last.pt#2", 2),  # half of epoch 2's last.pt written to its temp file
    ("replace:resume.pt#2", 2),  # epoch 2's resume.pt complete in the temp file, not yet renamed
    ("write:history.csv#2", 3),  # epoch 2 fully saved except history.csv
    ("epoch#3", 3),  # epoch 3 validated, nothing saved yet
    ("write:best.pt#1", 1),  # the very first save: nothing to resume, last.pt never existed
]


def train_cmd(data: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "training/train.py"),
        *train_argv(data, augment="basic", deterministic=True, epochs=EPOCHS, name=name),
        *extra,
    ]


def run(cmd: list[str], cwd: Path, crash: str | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    env.pop("CLS_CRASH_AT", None)
    if crash:
        env["CLS_CRASH_AT"] = crash
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def history(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = make_folder(root / "data", per_class=10, odd_files=False)
    ref = run(train_cmd(data, "ref"), root)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return root, data


@pytest.mark.parametrize(("point", "restart_epoch"), KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_sigkill_then_resume_matches_uninterrupted_run(crash_env, point, restart_epoch):
    root, data = crash_env
    name = "k-" + point.replace(":", "-").replace("#", "-").replace(".", "-")
    killed = run(train_cmd(data, name), root, crash=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = root / "artifacts/runs" / name
    temps = [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert bool(temps) == point.startswith(("write:", "replace:"))  # it really died inside a save
    assert (run_dir / "last.pt").exists() == (restart_epoch > 1)  # only the very first save leaves none
    if restart_epoch > 1:
        ck = load_checkpoint(run_dir / "last.pt")  # whatever moment it died, last.pt is a whole checkpoint
        assert ck.metrics["epoch"] >= restart_epoch - 1
    if restart_epoch == 1:  # died inside the first save: nothing to resume yet, and it says so
        res = run(train_cmd(data, name, "--resume", name), root)
        assert res.returncode == 2 and "nothing to resume" in res.stderr
        return
    # bare --resume picks the run that crashed (most recent resume.pt), not runs/latest
    res = run(train_cmd(data, name, "--resume"), root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming {name} at epoch {restart_epoch}/{EPOCHS}" in res.stdout
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]  # dead writers' temp files removed
    ref_dir = root / "artifacts/runs/ref"
    got, want = history(run_dir), history(ref_dir)
    assert [r["epoch"] for r in got] == list(range(1, EPOCHS + 1))
    for g, w in zip(got, want, strict=True):
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9)
        for k in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert abs(g[k] - w[k]) <= 1e-6, (k, g["epoch"], g[k], w[k])
    a, b = load_checkpoint(run_dir / "last.pt").state_dict, load_checkpoint(ref_dir / "last.pt").state_dict
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    assert torch.load(run_dir / "resume.pt", weights_only=True)["epoch"] == EPOCHS


def test_sigkill_then_resume_with_ema_matches_uninterrupted_run(crash_env):
    """--ema: resume.pt holds the averaged model and the live weights; a run killed mid-epoch 2 and resumed ends
    with the uninterrupted --ema run's history and weights."""
    root, data = crash_env
    ref = run(train_cmd(data, "ref-ema", "--ema", "0.9"), root)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run(train_cmd(data, "k-ema", "--ema", "0.9"), root, crash="step#6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    res = run(train_cmd(data, "k-ema", "--ema", "0.9", "--resume", "k-ema"), root)
    assert res.returncode == 0 and "resuming k-ema at epoch 2/" in res.stdout, res.stderr[-2000:]
    runs = root / "artifacts/runs"
    got, want = history(runs / "k-ema"), history(runs / "ref-ema")
    assert len(got) == EPOCHS and history(runs / "ref")[-1]["val_loss"] != want[-1]["val_loss"]
    for g, w in zip(got, want, strict=True):
        for k in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert abs(g[k] - w[k]) <= 1e-6, (k, g["epoch"], g[k], w[k])
    a, b = load_checkpoint(runs / "k-ema/last.pt").state_dict, load_checkpoint(runs / "ref-ema/last.pt").state_dict
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_resume_without_any_run_is_a_clear_error(workdir, tiny_folder, capsys):
    from core.errors import run_cli
    from training import train

    assert run_cli(train.main, train_argv(tiny_folder, "--resume", name="x")) == 2
    assert capsys.readouterr().err.strip().startswith("error: nothing to resume")


def digits_cmd(name: str, batch: int, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [
        *(launcher if nproc > 1 else [sys.executable]),
        str(ROOT / "training/train.py"),
        # linear: no BatchNorm, no dropout: per-rank batches then add up to exactly the global batch
        *train_argv("digits", model="linear", dropout=0, epochs=3, image_size=None, batch_size=batch, name=name),
        "--deterministic",
        *extra,
    ]


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory) -> Path:
    """The plain engine's digits run in one process, global batch 32, one thread: what torchrun and Lightning must
    reproduce (trained once per module and worker, not once per test)."""
    root = tmp_path_factory.mktemp("digits")
    res = run(digits_cmd("one", 32), root, OMP_NUM_THREADS="1")
    assert res.returncode == 0, res.stderr[-2000:]
    return root / "artifacts/runs/one"


def test_torchrun_gloo_two_processes_equal_one_process_with_the_same_global_batch(digits_ref, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # two processes train epochs 1-2 and are killed at the end of epoch 2 on every rank, then resumed under
    # torchrun: every epoch's numbers, from either side of the kill, must be the one-process run's
    killed = run(digits_cmd("resumed", 16, nproc=2), tmp_path, crash="epoch#2")
    assert killed.returncode != 0
    res = run(digits_cmd("resumed", 16, "--resume", "resumed", nproc=2), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming resumed at epoch 2/3" in res.stdout and "2 processes (global batch 32)" in res.stdout
    assert res.stdout.count("wrote ") == 1 and res.stdout.count("epoch   3/3") == 1  # rank 0 logs, once
    runs = tmp_path / "artifacts/runs"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "resumed"]
    got, ref = history(runs / "resumed"), history(digits_ref)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    for g, w in zip(got, ref, strict=True):
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9)
        assert g["train_acc"] == w["train_acc"] and g["val_acc"] == w["val_acc"]  # metrics reduced over ranks
        for k in ("train_loss", "val_loss"):
            assert abs(g[k] - w[k]) <= 1e-5, (k, g["epoch"], g[k], w[k])
    a = load_checkpoint(runs / "resumed" / "best.pt")
    b = load_checkpoint(digits_ref / "best.pt")
    assert max((a.state_dict[k] - b.state_dict[k]).abs().max().item() for k in a.state_dict) <= 1e-5
    assert a.metrics["accuracy"] == b.metrics["accuracy"] and a.metrics["n"] == b.metrics["n"] == 450


def test_sync_bn_on_cpu_is_refused_clearly(workdir, tiny_folder, capsys):
    from core.errors import run_cli
    from training import train

    assert run_cli(train.main, train_argv(tiny_folder, "--sync-bn", name="s")) == 2
    assert "--sync-bn needs CUDA" in capsys.readouterr().err
    assert not (workdir / "artifacts/runs").exists()  # refused before any run folder was made


def test_lightning_engine_same_format_same_numbers_and_resumes_across_engines(digits_ref, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lit = run(digits_cmd("lit", 32, "--engine", "lightning"), tmp_path)
    assert lit.returncode == 0, lit.stderr[-2000:]
    assert "engine lightning" in lit.stdout
    killed = run(digits_cmd("mixed", 32, "--engine", "lightning"), tmp_path, crash="epoch#2")
    assert killed.returncode == -signal.SIGKILL
    res = run(digits_cmd("mixed", 32, "--resume", "mixed"), tmp_path)  # finished by the plain engine
    assert res.returncode == 0 and "resuming mixed at epoch 2/3" in res.stdout, res.stderr[-2000:]
    runs = tmp_path / "artifacts/runs"
    ref = load_checkpoint(digits_ref / "best.pt")
    raw_ref = torch.load(digits_ref / "best.pt", weights_only=True)
    for name in ("lit", "mixed"):
        ck = load_checkpoint(runs / name / "best.pt")
        raw = torch.load(runs / name / "best.pt", weights_only=True)
        assert set(raw) == set(raw_ref) and raw["format_version"] == raw_ref["format_version"]
        assert ck.spec == ref.spec and set(ck.metrics) == set(ref.metrics)
        assert ck.state_dict.keys() == ref.state_dict.keys()
        assert abs(ck.metrics["accuracy"] - ref.metrics["accuracy"]) <= 0.01  # comparable (here: equal)
        for g, w in zip(history(runs / name), history(digits_ref), strict=True):
            assert abs(g["train_loss"] - w["train_loss"]) <= 1e-6 and abs(g["val_loss"] - w["val_loss"]) <= 1e-6


def test_lightning_engine_averages_weights_like_the_plain_one(digits_ref, tmp_path, monkeypatch):
    """--ema under --engine lightning: the same averaged numbers as the plain engine, and different ones from a run
    without the average."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name, extra in (("pe", ("--ema", "0.9")), ("le", ("--ema", "0.9", "--engine", "lightning"))):
        res = run(digits_cmd(name, 32, *extra), tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    runs = tmp_path / "artifacts/runs"
    plain, pe, le = history(digits_ref), history(runs / "pe"), history(runs / "le")
    assert any(abs(a["val_loss"] - b["val_loss"]) > 1e-4 for a, b in zip(plain, pe, strict=True))
    for g, w in zip(le, pe, strict=True):
        assert abs(g["train_loss"] - w["train_loss"]) <= 1e-6 and abs(g["val_loss"] - w["val_loss"]) <= 1e-6
    a, b = load_checkpoint(runs / "le/best.pt").state_dict, load_checkpoint(runs / "pe/best.pt").state_dict
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_lightning_missing_is_a_clear_error(workdir, monkeypatch, capsys):
    import builtins

    from core.errors import run_cli
    from training import train

    real_import = builtins.__import__

    def no_lightning(name, *a, **k):
        if name.startswith("lightning"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    argv = train_argv("digits", model="linear", image_size=None, engine="lightning")
    assert run_cli(train.main, argv) == 2
    assert "pip install lightning" in capsys.readouterr().err
    assert not (workdir / "artifacts/runs").exists()  # refused before any run folder was made
