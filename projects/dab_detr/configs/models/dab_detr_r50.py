"""DAB-DETR R50 (detrex ``projects/dab_detr/configs/models/dab_detr_r50.py``): the teacher.

300 dynamic anchor boxes, 6+6 layers, FFN 2048 with PReLU, dropout 0, sine positions with
temperature 20, focal-loss criterion (1 / 5 / 2) on every decoder stage.
"""
import torch.nn as nn

from tprd.config import LazyCall as L
from tprd.layers.position_embedding import PositionEmbeddingSine
from tprd.modeling.backbone import ResNet
from tprd.modeling.criterion import SetCriterion
from tprd.modeling.dab_detr import (
    DABDETR,
    DabDetrTransformer,
    DabDetrTransformerDecoder,
    DabDetrTransformerEncoder,
)
from tprd.modeling.matcher import HungarianMatcher

model = L(DABDETR)(
    backbone=L(ResNet)(
        depth=50,
        out_features=["res2", "res3", "res4", "res5"],
        freeze_at=1,
        norm="FrozenBN",
    ),
    in_features=["res5"],  # DAB-DETR reads the last level only
    in_channels=2048,
    position_embedding=L(PositionEmbeddingSine)(
        num_pos_feats=128,
        temperature=20,
        normalize=True,
    ),
    transformer=L(DabDetrTransformer)(
        encoder=L(DabDetrTransformerEncoder)(
            embed_dim=256,
            num_heads=8,
            attn_dropout=0.0,
            feedforward_dim=2048,
            ffn_dropout=0.0,
            activation=L(nn.PReLU)(),
            num_layers=6,
        ),
        decoder=L(DabDetrTransformerDecoder)(
            embed_dim=256,
            num_heads=8,
            attn_dropout=0.0,
            feedforward_dim=2048,
            ffn_dropout=0.0,
            activation=L(nn.PReLU)(),
            num_layers=6,
            modulate_hw_attn=True,
        ),
    ),
    embed_dim=256,
    num_classes=80,
    num_queries=300,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",  # one key for the class count, as in the other detectors
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
    ),
    aux_loss=True,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    # detrex's anchor-centre "freeze" is a no-op: this flag only selects the uniform centre init,
    # the anchors stay trainable (docs/methods.md#diff-22).
    freeze_anchor_box_centers=True,
    select_box_nums_for_evaluation=300,
    use_checkpoint=False,  # activation checkpointing of encoder/decoder layers (exact; less memory)
    # detrex never masks padded memory tokens in the decoder's cross-attention.
    mask_decoder_memory=False,
)

# the same weights for the auxiliary (earlier-stage) losses: loss_class_0 .. loss_giou_4
if model.aux_loss:
    _weight_dict = model.criterion.weight_dict
    _aux_weight_dict = {}
    for i in range(model.transformer.decoder.num_layers - 1):
        _aux_weight_dict.update({k + f"_{i}": v for k, v in _weight_dict.items()})
    _weight_dict.update(_aux_weight_dict)
    model.criterion.weight_dict = _weight_dict
