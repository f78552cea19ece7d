"""RT-DETRv2's optimizers (official ``configs/rtdetrv2/include/optimizer.yml`` and the per-model
overrides; docs/rt_detr.md#training-recipe): AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 1e-4,
parameter groups by regular expressions on the parameter names (:func:`regex_optimizer_params`).

* ``AdamW`` (R50vd, R50vd-m, R101vd: ``rtdetrv2_r50vd_6x_coco.yml`` ...): backbone parameters that
  are not norms at lr 1e-5; norm / BN parameters of the encoder and decoder without weight decay.
* ``AdamW_r18`` (R18vd, R34vd: ``rtdetrv2_r18vd_120e_coco.yml``, ``rtdetrv2_r34vd_120e_coco.yml``):
  one lr (1e-4) for every parameter, backbone included; norm / BN parameters without weight decay.

The patterns are the reference's; they search anywhere in the name, so a distiller's
``student.backbone...`` names fall into the same groups. Before instantiating, the trainer sets
``optimizer.params.model = model``.
"""
import torch

from tprd.config import LazyCall as L
from tprd.engine.optim import regex_optimizer_params

AdamW = L(torch.optim.AdamW)(
    params=L(regex_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        groups=[
            {"params": r"^(?=.*backbone)(?!.*norm).*$", "lr": 1e-5},
            {"params": r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", "weight_decay": 0.0},
        ],
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

AdamW_r18 = L(torch.optim.AdamW)(
    params=L(regex_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        groups=[{"params": r"^(?=.*(?:norm|bn)).*$", "weight_decay": 0.0}],
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
