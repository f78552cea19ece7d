# COCO step schedules (detrex convention: 7500 iterations per epoch at total batch 16).
# An lr_multiplier is a function of the training fraction iteration / train.max_iter, so the
# milestones scale with train.max_iter; each schedule below comes with the matching max_iter.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L
from tprd.engine.lr_scheduler import WarmupParamScheduler

ITERS_PER_EPOCH = 7500


def default_coco_scheduler(epochs=50, decay_epochs=40, warmup_epochs=0, iters_per_epoch=ITERS_PER_EPOCH):
    """x1 until `decay_epochs`, then x0.1; optional linear warmup from x0.001 (in epochs)."""
    total = epochs * iters_per_epoch
    scheduler = L(MultiStepParamScheduler)(
        values=[1.0, 0.1],
        milestones=[decay_epochs * iters_per_epoch, total],
    )
    return L(WarmupParamScheduler)(
        scheduler=scheduler,
        warmup_length=warmup_epochs * iters_per_epoch / total,
        warmup_method="linear",
        warmup_factor=0.001,
    )


def default_X_scheduler(num_X):
    """detrex's `num_X`-epoch schedule: x0.1 after epoch num_X - 10 (12 ep: after epoch 11)."""
    decay = {12: 11, 24: 20, 36: 30, 50: 40}.get(num_X, max(num_X - 10, 1))
    return default_coco_scheduler(num_X, decay, 0)


# docs/methods.md#schedules: 50 ep = 375000 it, x0.1 at 300000 (Deformable DETR, DAB-DETR);
# 12 ep = 90000 it, x0.1 at 82500 (DINO). Set train.max_iter = epochs * 7500 with each.
lr_multiplier_12ep = default_X_scheduler(12)
lr_multiplier_24ep = default_X_scheduler(24)
lr_multiplier_36ep = default_X_scheduler(36)
lr_multiplier_50ep = default_X_scheduler(50)
