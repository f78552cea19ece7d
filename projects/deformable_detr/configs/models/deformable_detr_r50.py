"""Deformable DETR R50 (detrex ``projects/deformable_detr/configs/models/deformable_detr_r50.py``): the teacher.

ResNet-50 (FrozenBN, stem frozen) -> ChannelMapper (res3..res5 + one stride-2 level, 256 channels,
GroupNorm 32) -> 6 encoder + 6 decoder deformable layers (8 heads, 4 levels x 4 points, FFN 1024,
dropout 0.1) -> 300 queries, 80 classes, heads shared by all stages; focal criterion 1 / 5 / 2 on
every stage. Variants: ``model.with_box_refine=True``; two-stage additionally
``model.as_two_stage=True`` (the transformer follows through the interpolation).
"""
from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.modeling.criterion import SetCriterion
from tprd.modeling.deformable_detr import (
    DeformableDETR,
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerEncoder,
)
from tprd.modeling.matcher import HungarianMatcher

# ResNet-50 (res3..res5) -> ChannelMapper (4 levels, 256 channels) and sine positions, as DINO
_resnet_mapper = get_config("common/models/resnet_channel_mapper.py")  # "_": not a config entry

model = L(DeformableDETR)(
    backbone=_resnet_mapper.backbone,
    position_embedding=_resnet_mapper.position_embedding,
    neck=_resnet_mapper.neck,
    transformer=L(DeformableTransformer)(
        encoder=L(DeformableTransformerEncoder)(
            embed_dim=256,
            num_heads=8,
            feedforward_dim=1024,
            attn_dropout=0.1,
            ffn_dropout=0.1,
            num_layers=6,
            post_norm=False,
            num_feature_levels="${..num_feature_levels}",
        ),
        decoder=L(DeformableTransformerDecoder)(
            embed_dim=256,
            num_heads=8,
            feedforward_dim=1024,
            attn_dropout=0.1,
            ffn_dropout=0.1,
            num_layers=6,
            return_intermediate=True,
            num_feature_levels="${..num_feature_levels}",
        ),
        as_two_stage="${..as_two_stage}",
        num_feature_levels=4,
        two_stage_num_proposals="${..num_queries}",
    ),
    embed_dim=256,
    num_classes=80,
    num_queries=300,
    aux_loss=True,
    with_box_refine=False,
    as_two_stage=False,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=2.0,
            cost_bbox=5.0,
            cost_giou=2.0,
            alpha=0.25,
            gamma=2.0,
        ),
        weight_dict={
            "loss_class": 1.0,
            "loss_bbox": 5.0,
            "loss_giou": 2.0,
        },
        alpha=0.25,
        gamma=2.0,
        # detrex's DeformableCriterion: two-stage proposals are matched and supervised as one class
        two_stage_binary_cls=True,
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    select_box_nums_for_evaluation=300,
    use_checkpoint=False,  # activation checkpointing of encoder/decoder layers (exact; less memory)
    msda_backend=None,  # None: process-wide "auto"; or "pytorch", "grid_sample", "cpp", "triton"
    # per-level padding masks: "nearest" reproduces detrex; "exact" treats a padded image exactly
    # like the same image alone
    mask_mode="nearest",
    device="cuda",
)

# the same weights for the earlier stages (loss_class_0 .. loss_giou_4) and the two-stage proposals
if model.aux_loss:
    _weight_dict = model.criterion.weight_dict
    _aux_weight_dict = {}
    for i in range(model.transformer.decoder.num_layers - 1):
        _aux_weight_dict.update({k + f"_{i}": v for k, v in _weight_dict.items()})
    _aux_weight_dict.update({k + "_enc": v for k, v in _weight_dict.items()})
    _weight_dict.update(_aux_weight_dict)
    model.criterion.weight_dict = _weight_dict
