"""Run folders under artifacts/runs/: naming, the `latest` pointer, and resolving default checkpoints."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.atomic import atomic_write
from core.errors import UserError

ARTIFACTS = Path(os.environ.get("CLS_ARTIFACTS", "artifacts"))
RUNS = ARTIFACTS / "runs"


def new_run_dir(name: str | None, mode: str, model: str, data: str, resume: bool) -> Path:
    name = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{mode}-{model}-{Path(data).name}"
    run = RUNS / name
    if run.exists() and not resume and any(run.iterdir()):
        raise UserError(f"run folder {run} already exists; pass --resume to continue it or choose another --name")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create {run} ({e.strerror}); run where artifacts/ is writable or point CLS_ARTIFACTS elsewhere"
        ) from None
    return run


def point_latest(run: Path) -> None:
    """Atomically repoint runs/latest at `run` (a relative symlink; a text file where symlinks fail)."""
    link = run.parent / "latest"
    tmp = run.parent / f".latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run.name, tmp)
        os.replace(tmp, link)
    except OSError:
        (run.parent / "LATEST").write_text(run.name)


def latest_run() -> Path | None:
    """The run runs/latest points at (a symlink; the run named in runs/LATEST where symlinks fail), if any."""
    latest = RUNS / "latest"
    if not latest.exists() and (RUNS / "LATEST").is_file():
        latest = RUNS / (RUNS / "LATEST").read_text().strip()
    return latest if latest.is_dir() else None


def resolve_checkpoint(arg: str | None, fallback: Callable[[], Path] | None = None) -> Path:
    """The one checkpoint resolver of every stage: a file as given; a run folder -> its best.pt; nothing -> the
    latest run's best.pt, else `fallback()` (export: the pretrained ImageNet model), else a one-line error."""
    if not arg:
        run = latest_run()
        if run is not None and (run / "best.pt").is_file():
            return run / "best.pt"
        if fallback is not None:
            return fallback()
        raise UserError(f"no trained model under {RUNS}; run `python training/train.py` first or pass --checkpoint")
    p = Path(arg)
    if p.is_dir():
        p = p / "best.pt"
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist")
    return p


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
