"""The INT8 accuracy budget's gates, shared by the INT8 search (export/quantize.py) and the validation of every
artifact (export/validate.py): the one place its command-line flags are written (its numbers: core/gates.py)."""

from __future__ import annotations

import argparse
from dataclasses import fields

import numpy as np

from core.errors import UserError
from core.gates import Budget, compare, fits, worst_of

__all__ = ["Budget", "add_budget_flags", "budget_from", "compare", "fits", "judge_candidate", "worst_of"]


FLAGS = {  # Budget field -> (flag, help)
    "max_drop": ("--max-drop", "INT8 budget: top-1 drop vs fp32 (points)"),
    "min_agreement": ("--min-agreement", "INT8 budget: %% top-1 agreement"),
    "max_class_drop": ("--max-class-drop", "INT8 budget: worst class drop (points)"),
}


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(Budget):
        flag, text = FLAGS[f.name]
        p.add_argument(flag, type=float, default=f.default, help=text)


def budget_from(args: argparse.Namespace) -> Budget:
    """The budget from the command line, refused at once when no model could ever meet it."""
    if not 0.0 <= args.min_agreement <= 100.0:
        raise UserError(f"--min-agreement {args.min_agreement} cannot be met: give a percentage between 0 and 100")
    if args.max_drop < 0 or args.max_class_drop < 0:
        raise UserError("--max-drop and --max-class-drop are allowed losses in points: give values >= 0")
    return Budget(args.max_drop, args.min_agreement, args.max_class_drop)


def judge_candidate(
    model, path, write, runner, select_x: np.ndarray, select_y: np.ndarray, budget: Budget, config: str
) -> dict:
    """Write an INT8 candidate beside `path`, compare it with the fp32 `model` on the selection images (validation,
    never test) and move it to `path` only if it fits the budget; the candidate never outlives the call.
    `write(p)` writes the candidate file, `runner(p)` gives its numpy -> logits function."""
    import os

    import torch

    tmp = path.with_name(f".{path.name}.candidate-{os.getpid()}")
    write(tmp)
    size_mb = tmp.stat().st_size / 2**20
    try:
        with torch.inference_mode():
            chunks = [select_x[i : i + 32] for i in range(0, len(select_x), 32)]
            ref = np.concatenate([model(torch.from_numpy(np.ascontiguousarray(c, np.float32))).numpy() for c in chunks])
        stats = compare(ref, runner(tmp)(select_x), select_y)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    ok = fits(stats, budget)
    if ok:
        os.replace(tmp, path)
    else:
        tmp.unlink(missing_ok=True)
    return {"config": config, "fits": ok, "size_mb": size_mb, **stats}
