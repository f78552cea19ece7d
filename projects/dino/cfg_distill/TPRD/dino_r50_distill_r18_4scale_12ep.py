"""TPRD alone (``tprd_kd``), DINO (4-scale) R50 -> R18, COCO, 12 epochs.

The pure-TPRD ablation (ours; the reference has no stand-alone TPRD): per decoder stage the student's
queries are soft-matched (B3) to the TPRD-refined teacher predictions and distilled with TPRD-CKD
(class 3.0, positives mapped through the alignment), L1 (5.0) and GIoU (2.0) towards the refined
boxes, all / (B*N) (``configs/common/tprd_kd.py``). ``model.methods.tprd_kd.refine=False`` gives the
same method with raw teacher targets and the soft-BCE class term, to measure TPRD's own effect.
Refinement shares are logged as ``tprd_tprd_kd_*``.
"""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"tprd_kd": get_config("common/tprd_kd.py").tprd_kd}
