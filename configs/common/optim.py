# AdamW with per-parameter lr factors (docs/methods.md#schedules, #diff-21: every lr comes from the
# config). Before instantiating, the trainer sets `optimizer.params.model = model`.
import torch

from tprd.config import LazyCall as L
from tprd.engine.optim import backbone_lr_factor, deformable_lr_factor, get_default_optimizer_params

# Deformable DETR and DINO: three groups -- base lr; backbone x0.1; parameters named
# "reference_points" / "sampling_offsets" x0.1. Weight decay 1e-4 on every group, norms included.
AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=1e-4,
        lr_factor_func=deformable_lr_factor,
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

# DAB-DETR: backbone x0.1, no weight decay on normalisation layers.
AdamW_dab = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        lr_factor_func=backbone_lr_factor,
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
