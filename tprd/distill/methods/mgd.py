"""MGD, masked generative distillation (docs/methods.md#mgd; method name ``mgd``, stage-free term ``mgd``).

Per neck level ``l``: a 1x1 adapter ``A_l`` (D -> D) on the student map, a random spatial mask
``M [B,1,H,W]`` (a cell is dropped, i.e. set to 0, where a uniform draw exceeds ``1 − mask_ratio``),
a generation block ``G_l`` = 3x3 conv (D -> D, pad 1) -> ReLU -> 3x3 conv (D -> D, pad 1), and

    mgd_l = mean_{B,D,H,W} (G_l(M · A_l(F_s)) − F_t)² / B

(the reference's extra division by ``B`` is kept for parity, docs/methods.md#diff-15; ``B`` is the reference's
images per process at this run's total batch, ``total batch / reference_processes``, so the term is
the same on any number of processes: see :func:`~tprd.distill.methods.neck.batch_divisor`). The
term is the mean over the levels. The teacher runs only to its neck (docs/methods.md#diff-14).

Masks are drawn on the CPU from a generator seeded from ``(seed, iteration, rank)`` (see
:func:`mask_seed`), level after level, so a run resumed at iteration ``i`` draws exactly the masks
an uninterrupted run draws at ``i``; configs pass ``seed = train.seed``. The iteration is the
trainer's, read from the event storage; without one (a Distiller outside a trainer) a call counter
is used.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import DistillContext, DistillMethod
from .neck import REFERENCE_PROCESSES, batch_divisor, check_same_necks, neck_pairs

__all__ = ["MGD", "mask_seed", "mgd_masks"]


def mask_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """Seed of the mask generator for one iteration and process (a fixed mixing of the three)."""
    return (int(seed) * 1_000_003 + int(iteration) * 7_919 + int(rank) * 104_729 + 0x5F3759DF) % (2**63 - 1)


def mgd_masks(shapes: Sequence[Tuple[int, int, int]], mask_ratio: float, generator: torch.Generator) -> List[Tensor]:
    """Keep-masks ``[B,1,H,W]`` (float 0/1, CPU) for each ``(B, H, W)`` in ``shapes``, drawn in order:
    0 where ``u > 1 − mask_ratio`` for ``u ~ U[0,1)``, 1 elsewhere."""
    out = []
    for b, h, w in shapes:
        u = torch.rand(b, 1, h, w, generator=generator)
        out.append((u <= 1.0 - mask_ratio).float())
    return out


class MGD(DistillMethod):
    """MGD on every neck level.

    Args:
        weights: ``{"mgd": w}`` (default 10.0).
        mask_ratio: share of dropped cells in expectation (0.5).
        seed: base seed of the masks (configs: ``train.seed``).
        num_levels, channels: the neck's levels and width (default: from the models at construction).
        reference_processes: the MSE is divided again by ``total batch / reference_processes``
            (default 2: the reference's 2 GPUs x 8 images, where the weight was tuned).
    """

    name = "mgd"
    terms = ("mgd",)
    needs = ("neck",)
    # the reference's per-level 1x1 adapters and generation blocks (conv, ReLU, conv)
    reference_key_rules = ((r"^align\.(\d+)\.", r"adapters.\1."), (r"^generation\.(\d+)\.", r"generators.\1."))

    def __init__(self, weights: Optional[Dict[str, float]] = None, mask_ratio: float = 0.5, seed: int = 0,
                 num_levels: Optional[int] = None, channels: Optional[int] = None, name: Optional[str] = None,
                 reference_processes: int = REFERENCE_PROCESSES):
        super().__init__(weights if weights is not None else {"mgd": 10.0}, name)
        batch_divisor(1, reference_processes)  # checks the value
        self.reference_processes = int(reference_processes)
        if not 0.0 <= float(mask_ratio) <= 1.0:
            raise ValueError(f"MGD mask_ratio must be in [0, 1], got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.seed = int(seed)
        self.adapters = nn.ModuleList()
        self.generators = nn.ModuleList()
        self._calls = 0
        if num_levels is not None and channels is not None:
            self._build(int(num_levels), int(channels))

    def _build(self, num_levels: int, channels: int) -> None:
        self.adapters = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=1) for _ in range(num_levels))
        self.generators = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            )
            for _ in range(num_levels)
        )

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        levels, channels = check_same_necks(student, teacher, "MGD")
        if len(self.adapters) == 0:
            self._build(levels, channels)
        elif len(self.adapters) != levels or self.adapters[0].in_channels != channels:
            raise ValueError(f"MGD was built for {len(self.adapters)} levels of {self.adapters[0].in_channels} "
                             f"channels but the models have {levels} of {channels}")

    def generator_for(self, iteration: int) -> torch.Generator:
        """The mask generator of ``iteration`` on this process."""
        from tprd.utils import comm

        return torch.Generator().manual_seed(mask_seed(self.seed, iteration, comm.get_rank()))

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        pairs = neck_pairs(ctx, "MGD")
        iteration = ctx.iteration if ctx.iteration is not None else self._calls
        self._calls += 1
        shapes = [(fs.shape[0], fs.shape[2], fs.shape[3]) for fs, _ in pairs]
        masks = mgd_masks(shapes, self.mask_ratio, self.generator_for(iteration))
        divisor = batch_divisor(shapes[0][0], self.reference_processes)
        per_level = []
        for adapter, generate, (fs, ft), keep in zip(self.adapters, self.generators, pairs, masks):
            new = generate(adapter(fs) * keep.to(device=fs.device, dtype=fs.dtype))
            per_level.append((new - ft).pow(2).mean() / divisor)
        return {"mgd": torch.stack(per_level).mean()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mask_ratio={self.mask_ratio}, seed={self.seed}, weights={self.weights}"
