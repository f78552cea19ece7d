"""FitNet feature imitation (docs/methods.md#fitnet; method name ``fitnet``, one stage-free term ``fitnet``).

Per neck level ``l``: a 1x1 conv adapter ``A_l`` (D -> D, PyTorch's default init) on the student map,
then ``mean_{B,D,H,W} (A_l(F_s) − F_t)²`` **divided again by B** (the reference's normaliser, kept
for parity because the weight 10 was tuned with it, docs/methods.md#diff-15). ``B`` is the reference's images
per process at this run's total batch, ``total batch / reference_processes`` (see
:func:`~tprd.distill.methods.neck.batch_divisor`), so the term is the same on 1, 2 or 8 processes
(the reference divides by its own per-GPU batch, which doubles the term with every doubling of
the GPU count). The term is the mean over the levels. The teacher runs only to its neck (docs/methods.md#diff-14).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .base import DistillContext, DistillMethod
from .neck import REFERENCE_PROCESSES, batch_divisor, check_same_necks, neck_pairs

__all__ = ["FitNet"]


class FitNet(DistillMethod):
    """FitNet on every neck level.

    Args:
        weights: ``{"fitnet": w}`` (default 10.0).
        num_levels, channels: the neck's levels and width; by default taken from the models when the
            Distiller is built (adapters are created then, before the optimiser sees the parameters).
        reference_processes: the MSE is divided again by ``total batch / reference_processes``
            (default 2: the reference's 2 GPUs x 8 images, where the weight was tuned).
    """

    name = "fitnet"
    terms = ("fitnet",)
    needs = ("neck",)
    # the reference's per-level 1x1 adapters
    reference_key_rules = ((r"^align\.(\d+)\.", r"adapters.\1."),)

    def __init__(self, weights: Optional[Dict[str, float]] = None, num_levels: Optional[int] = None,
                 channels: Optional[int] = None, name: Optional[str] = None,
                 reference_processes: int = REFERENCE_PROCESSES):
        super().__init__(weights if weights is not None else {"fitnet": 10.0}, name)
        batch_divisor(1, reference_processes)  # checks the value
        self.reference_processes = int(reference_processes)
        self.adapters = nn.ModuleList()
        if num_levels is not None and channels is not None:
            self._build(int(num_levels), int(channels))

    def _build(self, num_levels: int, channels: int) -> None:
        self.adapters = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=1) for _ in range(num_levels))

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        levels, channels = check_same_necks(student, teacher, "FitNet")
        if len(self.adapters) == 0:
            self._build(levels, channels)
        elif len(self.adapters) != levels or self.adapters[0].in_channels != channels:
            raise ValueError(f"FitNet was built for {len(self.adapters)} levels of {self.adapters[0].in_channels} "
                             f"channels but the models have {levels} of {channels}")

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        pairs = neck_pairs(ctx, "FitNet")
        divisor = batch_divisor(pairs[0][0].shape[0], self.reference_processes)
        per_level = [(adapter(fs) - ft).pow(2).mean() / divisor for adapter, (fs, ft) in zip(self.adapters, pairs)]
        return {"fitnet": torch.stack(per_level).mean()}
