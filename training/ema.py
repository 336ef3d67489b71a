"""--ema: an exponential moving average of the trained weights (Polyak averaging), what timm's ModelEmaV3 and
torchvision's reference scripts (`--model-ema`) evaluate and save instead of the last step's weights.

The average covers every floating-point parameter and buffer of the trained module (BatchNorm running statistics
too, as timm does); integer buffers (num_batches_tracked) are copied. The decay warms up, d_n = min(decay,
(1 + n) / (10 + n)) after step n, so the first epochs are not pinned to the initial weights. Evaluation and the
checkpoints of an epoch run on the average: `swapped()` loads it into the module and restores the live weights
afterwards, so every path that reads the module (validation, INT8 validation, best.pt, last.pt) sees one model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _copy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


class WeightEma:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.module, self.decay, self.steps = module, decay, 0
        self.shadow = _copy(module.state_dict())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's weights after one optimizer step into the average."""
        self.steps += 1
        d = self.current_decay()
        for k, v in self.module.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach(), 1.0 - d)
            else:
                s.copy_(v)

    @contextmanager
    def swapped(self) -> Iterator[dict[str, torch.Tensor]]:
        """The average inside the module for the block; yields the live weights, restored on exit."""
        live = _copy(self.module.state_dict())
        self.module.load_state_dict(self.shadow)
        try:
            yield live
        finally:
            self.module.load_state_dict(live)

    def state(self, live: dict[str, torch.Tensor]) -> dict:
        """What resume.pt keeps beside the (averaged) model: the step count and the live weights."""
        return {"steps": self.steps, "live": {k: v.cpu() for k, v in live.items()}}

    def restore(self, state: dict) -> None:
        """After the model was loaded from resume.pt (which holds the average): the module's weights become the
        average again and the live weights go back into the module."""
        self.shadow, self.steps = _copy(self.module.state_dict()), int(state["steps"])
        self.module.load_state_dict(state["live"])


@contextmanager
def averaged(ema: WeightEma | None) -> Iterator[dict]:
    """The block evaluates and saves the average (nothing changes without one); yields what resume.pt adds for it."""
    if ema is None:
        yield {}
        return
    with ema.swapped() as live:
        yield {"ema": ema.state(live)}


def resumed_ema(module: nn.Module, decay: float, state: dict | None) -> WeightEma | None:
    """The average for a run (None with decay 0), created after the model was loaded from resume.pt: the average
    and the live weights of that epoch come back; a resume.pt written without an average starts one from the
    loaded weights."""
    if not decay:
        return None
    ema = WeightEma(module, decay)
    if state and "ema" in state:
        ema.restore(state["ema"])
    return ema
