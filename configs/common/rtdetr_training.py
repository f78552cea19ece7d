"""RT-DETRv2's COCO training set-up (official ``configs/rtdetrv2/include/optimizer.yml``,
``include/dataloader.yml``; docs/rt_detr.md#training-recipe), for the plain configs
``projects/rt_detr/configs/rtdetrv2_*_coco.py`` and the distillation bases
``projects/rt_detr/cfg_distill/base/``.

* AdamW lr 1e-4, weight decay 1e-4 (``common/rtdetr_optim.py``; the R50vd groups here, the R18vd /
  R34vd configs switch to ``AdamW_r18``); gradient clipping at norm 0.1;
* lr: linear warmup over the first 2000 iterations, then constant (the reference's MultiStepLR
  milestone is epoch 1000, i.e. never reached);
* EMA of the weights, decay 0.9999 with the reference's warmup ``decay·(1 − exp(−updates/2000))``;
  evaluations report the average as ``ema/bbox/...`` and ``--eval-only`` uses it;
* AMP (float16 with a GradScaler);
* total batch 16; ``train.max_iter`` = epochs x 7500 (the toolbox's COCO epoch at batch 16; 72
  epochs here) is set by each config (``r18vd_120e``: 120 epochs, ``r50vd_m_7x``: 84), which then
  sets ``lr_multiplier.warmup_length = 2000 / train.max_iter``.

Data: COCO 2017 (``common/coco_training.py``: total batch 16; contiguous labels 0..79, the
evaluator maps them back to COCO category ids, which is what the reference's
``remap_mscoco_category`` does) through RT-DETRv2's own pipeline (``include/dataloader.yml``;
``common/data/rtdetr_mappers.py``, docs/rt_detr.md#data-pipeline):

* train: RandomPhotometricDistort (p 0.5), RandomZoomOut (fill 0), RandomIoUCrop (p 0.8),
  SanitizeBoundingBoxes (min size 1), RandomHorizontalFlip, Resize 640x640, SanitizeBoundingBoxes;
  the first three stop at ``dataloader.train.mapper.stop_iter``;
* per batch, one square size of 480..800 (``RTDETR_TRAIN_SCALES``, the same on every process)
  until ``dataloader.train.batch_transform.stop_iter``;
* test: Resize 640x640.

The reference's stop epoch is an epoch index (0-based: ``epoch: 71`` leaves the last of 72 epochs
without those ops); here it is the iteration ``STOP_EPOCH x ITERS_PER_EPOCH``, which the loader
passes to the mapper and the batch transform, so ``--resume`` and any number of loader workers
switch at the same iteration. The defaults below are the L / X ones (stop epoch 71 of 72, with
multi-scale); each config sets its own (S: 117 of 120 without multi-scale, M*: 117, M: 81 of 84).
"""
from fvcore.common.param_scheduler import ConstantParamScheduler

from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.engine.lr_scheduler import WarmupParamScheduler

from .data.rtdetr_mappers import rtdetr_multiscale, rtdetr_test_mapper, rtdetr_train_mapper

ITERS_PER_EPOCH = 7500
WARMUP_ITERS = 2000
STOP_EPOCH = 71  # include/dataloader.yml: "epoch in [71, ~) stop ops" (and the multi-scale sizes)

_coco = get_config("common/coco_training.py")
dataloader = _coco.dataloader
dataloader.evaluator.output_dir = "${train.output_dir}"
dataloader.train.mapper = rtdetr_train_mapper((640, 640), stop_iter=STOP_EPOCH * ITERS_PER_EPOCH)
dataloader.train.batch_transform = rtdetr_multiscale(stop_iter=STOP_EPOCH * ITERS_PER_EPOCH)
dataloader.train.aspect_ratio_grouping = False  # every image becomes 640x640; the reference shuffles plainly
dataloader.test.mapper = rtdetr_test_mapper((640, 640))

optimizer = get_config("common/rtdetr_optim.py").AdamW

train = _coco.train
train.max_iter = 72 * ITERS_PER_EPOCH
train.eval_period = ITERS_PER_EPOCH
train.checkpointer = dict(period=ITERS_PER_EPOCH, max_to_keep=2)
train.amp = dict(enabled=True, dtype="float16")
train.clip_grad = dict(enabled=True, params=dict(max_norm=0.1, norm_type=2))
train.model_ema = dict(enabled=True, decay=0.9999, warmups=WARMUP_ITERS, use_ema_weights_for_eval_only=True)

# lr x1 after a linear warmup over 2000 iterations; warmup_length is a fraction of train.max_iter, so a
# config that changes max_iter sets lr_multiplier.warmup_length = 2000 / train.max_iter
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(ConstantParamScheduler)(value=1.0),
    warmup_length=WARMUP_ITERS / train.max_iter,
    warmup_method="linear",
    warmup_factor=0.001,
)
