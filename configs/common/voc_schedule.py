# Pascal VOC 07+12 schedule of the Deformable DETR configs (docs/methods.md#schedules): 50 epochs of 1035
# iterations at total batch 16 (51750 it), lr x0.1 after epoch 40, no warmup. The reference wrote
# the milestones in 1050-iteration units (42000 / 52500); as a fraction of training that is the same
# 0.8, so the decay happens at iteration 41400 either way.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L
from tprd.engine.lr_scheduler import WarmupParamScheduler

ITERS_PER_EPOCH = 1035


def default_voc_scheduler(epochs=50, decay_epochs=40, warmup_epochs=0, iters_per_epoch=ITERS_PER_EPOCH):
    total = epochs * iters_per_epoch
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1],
            milestones=[decay_epochs * iters_per_epoch, total],
        ),
        warmup_length=warmup_epochs * iters_per_epoch / total,
        warmup_method="linear",
        warmup_factor=0.001,
    )


lr_multiplier_50ep = default_voc_scheduler(50, 40, 0)  # with train.max_iter = 51750
