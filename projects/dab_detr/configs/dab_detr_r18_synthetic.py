"""DAB-DETR R18 on the synthetic shapes data, small enough for a CPU (about 2.5 minutes).

Five classes, 50 queries, 2 encoder + 2 decoder layers of width 128, batch 4, no ImageNet weights
(everything trains from scratch; the backbone with trainable BatchNorm). Evaluated with the COCO
evaluator at the end. A pipeline check, not an accuracy demo: DAB-DETR does not learn this data in
a CPU budget (box AP ~0), while Deformable DETR / DINO do (projects/{deformable_detr,dino}).

Measured runs (AP per seed, what was tried): benchmarks/detectors_synthetic.md#dab-detr.

    python projects/dab_detr/train_net.py \
        --config-file projects/dab_detr/configs/dab_detr_r18_synthetic.py train.output_dir=./output/dab_synth
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.engine.lr_scheduler import WarmupParamScheduler

from .models.dab_detr_r18 import model

dataloader = get_config("common/data/synthetic_detr.py").dataloader
optimizer = get_config("common/optim.py").AdamW_dab
train = get_config("common/train.py").train

NUM_CLASSES = 5
DIM = 128

model.num_classes = NUM_CLASSES
model.num_queries = 50
model.select_box_nums_for_evaluation = 50
model.embed_dim = DIM
model.backbone.norm = "BN"  # from scratch: FrozenBN would be the identity
model.backbone.freeze_at = 0
model.position_embedding.num_pos_feats = DIM // 2
for part in (model.transformer.encoder, model.transformer.decoder):
    part.embed_dim = DIM
    part.num_heads = 4
    part.feedforward_dim = 256
    part.num_layers = 2

train.output_dir = "./output/dab_detr_r18_synthetic"
train.device = "cpu"
train.max_iter = 600
train.eval_period = 0  # evaluate once, at the end
train.log_period = 20
train.checkpointer = dict(period=200, max_to_keep=2)

optimizer.lr = 4e-4
# no pretrained backbone here, so no backbone (or sampling-offset) lr reduction; on the synthetic
# config (Deformable DETR version, 600 iterations): AP 1.1 with the COCO lr factors, 3.6 without
optimizer.params.lr_factor_func = None

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[500, 600]),
    warmup_length=0.05,
    warmup_factor=0.1,
)

dataloader.train.total_batch_size = 4
dataloader.evaluator.output_dir = "${train.output_dir}"  # coco_instances_results.json
