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

Data: the toolbox's COCO detection data at total batch 16 (``common/coco_training.py``; contiguous
labels 0..79, the evaluator maps them back to COCO category ids, which is what the reference's
``remap_mscoco_category`` does). The RT-DETR augmentation pipeline is not wired in yet (see
docs/rt_detr.md#training-recipe): images go through the DETR mapper.
"""
from fvcore.common.param_scheduler import ConstantParamScheduler

from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.engine.lr_scheduler import WarmupParamScheduler

ITERS_PER_EPOCH = 7500
WARMUP_ITERS = 2000

_coco = get_config("common/coco_training.py")
dataloader = _coco.dataloader
dataloader.evaluator.output_dir = "${train.output_dir}"

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
