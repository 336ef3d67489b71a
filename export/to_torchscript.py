"""TorchScript for mobile: trace, freeze, optimize_for_mobile, save .pt and lite-interpreter .ptl.

    python export/to_torchscript.py [--checkpoint RUN/best.pt] [--out DIR]

TorchScript and PyTorch Mobile are deprecated upstream in favour of torch.export/ExecuTorch; we still ship
them because existing Android/iOS apps load .ptl files. The model spec rides along as the extra file
`model_spec.json`, so an app needs nothing else to preprocess and label.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

from core.checkpoint import Checkpoint
from core.errors import UserError, run_cli
from export.common import standalone_inputs, standalone_parser

EXTRA = "model_spec.json"


def _mobile(frozen: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, bool]:
    """optimize_for_mobile needs XNNPACK, which PyPI's CUDA builds of torch lack: then ship it unoptimized."""
    from torch.utils.mobile_optimizer import optimize_for_mobile

    try:
        return optimize_for_mobile(frozen), True
    except RuntimeError as e:
        if "XNNPACK" not in str(e):
            raise
        print("note: this torch build has no XNNPACK; model.ptl is saved without optimize_for_mobile")
        return frozen, False


def export_torchscript(model: torch.nn.Module, ck: Checkpoint, out: Path) -> dict[str, Path]:
    spec = ck.spec
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    extra = {EXTRA: spec.to_json()}
    paths = {"torchscript": out / "model.pt", "torchscript_mobile": out / "model.ptl"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model.eval(), x, check_trace=False)
            frozen = torch.jit.freeze(traced)
            mobile, _ = _mobile(frozen)
        except Exception as e:
            raise UserError(f"TorchScript export failed: {str(e).splitlines()[0][:160]}") from None
        for key, path in paths.items():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                if key == "torchscript":
                    torch.jit.save(frozen, str(tmp), _extra_files=extra)
                else:
                    mobile._save_for_lite_interpreter(str(tmp), _extra_files=extra)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise UserError(f"cannot write {path} ({e.strerror})") from None
    return paths


def load_torchscript(path: Path):
    """(callable module, spec JSON) for .pt (TorchScript) or .ptl (lite interpreter)."""
    extra = {EXTRA: ""}
    if path.suffix == ".ptl":
        from torch.jit.mobile import _load_for_lite_interpreter

        m = _load_for_lite_interpreter(str(path))
        return m, None
    m = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return m, extra[EXTRA] or None


def get_args_parser() -> argparse.ArgumentParser:
    return standalone_parser("Export a checkpoint to TorchScript (.pt) and PyTorch Mobile (.ptl).")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    model, ck, out = standalone_inputs(args)
    paths = export_torchscript(model, ck, out)
    for p in paths.values():
        print(f"wrote {p} ({p.stat().st_size / 2**20:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
