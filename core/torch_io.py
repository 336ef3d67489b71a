"""The one low-level torch file reader/writer: `torch.load(weights_only=True)` with no unsafe fallback (a pickle
that needs arbitrary globals, i.e. could run code, is refused with a clear message), atomic saves, and the wrapper
prefixes stripped from state dict keys. Checkpoints (core/checkpoint.py) and pretrained weights
(core/models/pretrained.py) both read through it."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write
from core.errors import UserError


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


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the bare module names them: without torch.compile's `_orig_mod.` and DDP's `module.`."""
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}
