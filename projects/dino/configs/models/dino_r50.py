"""DINO-4scale R50 (detrex ``projects/dino/configs/models/dino_r50.py``): the teacher.

ResNet-50 (FrozenBN, stem frozen) -> ChannelMapper (res3..res5 + one stride-2 level, 256 channels,
GroupNorm 32) -> 6 encoder + 6 decoder deformable layers (8 heads, 4 levels x 4 points, FFN 2048,
dropout 0) -> two-stage selection of 900 queries (learned content, selected boxes), contrastive
denoising (100 queries per kind, label noise 0.5, box noise 1.0), look-forward-twice refinement,
per-layer heads (6 decoder + 1 encoder); focal criterion 1 / 5 / 2 on every stage, on the encoder
proposals (``_enc``) and on the denoising queries (``_dn``).
"""
from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.modeling.dino import (
    DINO,
    DINOCriterion,
    DINOTransformer,
    DINOTransformerDecoder,
    DINOTransformerEncoder,
)
from tprd.modeling.matcher import HungarianMatcher

# ResNet-50 (res3..res5) -> ChannelMapper (4 levels, 256 channels) and sine positions, as Deformable DETR
_resnet_mapper = get_config("common/models/resnet_channel_mapper.py")  # "_": not a config entry

model = L(DINO)(
    backbone=_resnet_mapper.backbone,
    position_embedding=_resnet_mapper.position_embedding,
    neck=_resnet_mapper.neck,
    transformer=L(DINOTransformer)(
        encoder=L(DINOTransformerEncoder)(
            embed_dim=256,
            num_heads=8,
            feedforward_dim=2048,
            attn_dropout=0.0,
            ffn_dropout=0.0,
            num_layers=6,
            post_norm=False,
            num_feature_levels="${..num_feature_levels}",
        ),
        decoder=L(DINOTransformerDecoder)(
            embed_dim=256,
            num_heads=8,
            feedforward_dim=2048,
            attn_dropout=0.0,
            ffn_dropout=0.0,
            num_layers=6,
            return_intermediate=True,
            num_feature_levels="${..num_feature_levels}",
        ),
        num_feature_levels=4,
        two_stage_num_proposals="${..num_queries}",
    ),
    embed_dim=256,
    num_classes=80,
    num_queries=900,
    aux_loss=True,
    criterion=L(DINOCriterion)(
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
            "loss_class_dn": 1.0,
            "loss_bbox_dn": 5.0,
            "loss_giou_dn": 2.0,
        },
        alpha=0.25,
        gamma=2.0,
        # the encoder proposals are matched and supervised with the real classes
        two_stage_binary_cls=False,
    ),
    dn_number=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    select_box_nums_for_evaluation=300,
    use_checkpoint=False,  # activation checkpointing of encoder/decoder layers (exact; less memory)
    msda_backend=None,  # None: process-wide "auto"; or "pytorch", "grid_sample", "cpp", "triton"
    # per-level padding masks: "nearest" reproduces detrex's interpolated masks
    mask_mode="nearest",
)

# the same weights for the encoder proposals (_enc) and the earlier stages (_0 .. _4), dn included
if model.aux_loss:
    _weight_dict = model.criterion.weight_dict
    _base = dict(_weight_dict)
    _aux_weight_dict = {k + "_enc": v for k, v in _base.items()}
    for i in range(model.transformer.decoder.num_layers - 1):
        _aux_weight_dict.update({k + f"_{i}": v for k, v in _base.items()})
    _weight_dict.update(_aux_weight_dict)
    model.criterion.weight_dict = _weight_dict
