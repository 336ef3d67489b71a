"""Run folders under artifacts/runs/: naming, the `latest` pointer, and resolving default checkpoints."""

from __future__ import annotations

import json
import os
import time
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


def resolve_checkpoint(arg: str | None) -> Path:
    """`None` -> runs/latest/best.pt; a run folder -> its best.pt; else the path itself."""
    if arg is None:
        latest = RUNS / "latest"
        if not latest.exists() and (RUNS / "LATEST").is_file():
            latest = RUNS / (RUNS / "LATEST").read_text().strip()
        path = latest / "best.pt"
        if not path.is_file():
            raise UserError(f"no trained model at {path}; run `python training/train.py` first or pass --checkpoint")
        return path
    p = Path(arg)
    if p.is_dir():
        p = p / "best.pt"
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist")
    return p


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
