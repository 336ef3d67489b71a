"""Self-describing checkpoints: {format_version, spec, state_dict, metrics, args}, written atomically.

Loading goes through core/torch_io.py: `torch.load(weights_only=True)` with no unsafe fallback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from core.spec import ModelSpec
from core.torch_io import atomic_torch_save, safe_torch_load, strip_wrapper_prefixes

FORMAT_VERSION = 1


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
            "state_dict": strip_wrapper_prefixes(self.state_dict),
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
    from core.models import model_from_spec  # here, not at the top: importing the model zoo costs ~3 s

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
