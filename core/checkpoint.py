"""Self-describing checkpoints: {format_version, spec, state_dict, metrics, args}, written atomically.

Loading always uses `torch.load(weights_only=True)` with no unsafe fallback: a file whose pickle would
need arbitrary globals (i.e. could run code) is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write
from core.errors import UserError
from core.spec import ModelSpec

FORMAT_VERSION = 1


def safe_torch_load(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file, not a checkpoint")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and ("global" in str(e) or "GLOBAL" in str(e)):
            raise UserError(
                f"{p}: refused, its pickle needs code outside plain tensors/containers "
                "(unsafe to load); re-save it as a state dict from a trusted session"
            ) from None
        raise UserError(f"{p}: not a PyTorch checkpoint ({str(e).splitlines()[0][:80]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{p}: unreadable checkpoint, truncated or not a PyTorch file ({type(e).__name__})") from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Serialize in memory, then write atomically (core.atomic): the old file survives any crash."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "state_dict": strip_compile_prefix(self.state_dict),
            "metrics": self.metrics,
            "args": self.args,
        }


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    atomic_torch_save(ckpt.payload(), path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "spec" not in obj or "state_dict" not in obj:
        raise UserError(
            f"{path}: a torch file but not a checkpoint of this project (no model spec); "
            "pass a best.pt/last.pt written by training/train.py"
        )
    if int(obj.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {obj['format_version']} is newer than this code; upgrade")
    return Checkpoint(
        ModelSpec.from_dict(obj["spec"]),
        obj["state_dict"],
        obj.get("metrics") or {},
        obj.get("args") or {},
        Path(path),
    )


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the network from the checkpoint's spec and load its weights; returns it in eval mode."""
    from core.models import model_from_spec

    ckpt = load_checkpoint(path)
    model = model_from_spec(ckpt.spec)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not match the spec's architecture ({str(e).splitlines()[0][:120]})"
        ) from None
    return model.eval(), ckpt


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
