"""RT-DETRv2 R50vd (official ``configs/rtdetrv2/include/rtdetrv2_r50vd.yml``): the base model.

PResNet-50vd (FrozenBN, stem frozen: ``freeze_at=0``) -> hybrid encoder (hidden 256, AIFI on the
stride-32 map with FFN 1024 / GELU, CSP-RepVGG FPN + PAN with SiLU, expansion 1.0) -> decoder input
projection (3 levels) -> query selection of 300 tokens -> 6 post-norm decoder layers (8 heads, 4 points
per level, FFN 1024) -> per-layer heads; contrastive denoising (100 queries, label noise 0.5, box noise
1.0); VFL 1 / L1 5 / GIoU 2 on every layer, the denoising queries and the encoder proposals
(docs/rt_detr.md). ``eval_spatial_size`` 640x640: the size of the cached anchors in the official
checkpoints (required for a strict load).

Labels are the dataset's contiguous class indices (``remap_mscoco_category=False``; the COCO evaluator
maps them back to category ids). Inputs: 0..255 RGB, divided by 255, no mean/std.
"""
from tprd.config import LazyCall as L
from tprd.modeling.hybrid_encoder import HybridEncoder
from tprd.modeling.presnet import PResNet
from tprd.modeling.rt_detr import RTDETR
from tprd.modeling.rtdetr_criterion import RTDETRCriterion, RTDETRHungarianMatcher, RTDETRPostProcessor
from tprd.modeling.rtdetr_decoder import RTDETRTransformerv2

model = L(RTDETR)(
    backbone=L(PResNet)(
        depth=50,
        variant="d",
        num_stages=4,
        return_idx=[1, 2, 3],
        act="relu",
        freeze_at=0,
        freeze_norm=True,
        pretrained=False,
    ),
    encoder=L(HybridEncoder)(
        in_channels=[512, 1024, 2048],
        feat_strides=[8, 16, 32],
        hidden_dim=256,
        use_encoder_idx=[2],
        num_encoder_layers=1,
        nhead=8,
        dim_feedforward=1024,
        dropout=0.0,
        enc_act="gelu",
        expansion=1.0,
        depth_mult=1,
        act="silu",
        pe_temperature=10000,
        eval_spatial_size=[640, 640],
        version="v2",
    ),
    decoder=L(RTDETRTransformerv2)(
        num_classes=80,
        hidden_dim=256,
        num_queries=300,
        feat_channels=[256, 256, 256],  # = encoder.hidden_dim
        feat_strides=[8, 16, 32],
        num_levels=3,
        num_points=[4, 4, 4],
        nhead=8,
        num_layers=6,
        dim_feedforward=1024,
        dropout=0.0,
        activation="relu",
        num_denoising=100,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        learn_query_content=False,
        eval_spatial_size="${..encoder.eval_spatial_size}",
        eval_idx=-1,
        eps=0.01,
        aux_loss=True,
        cross_attn_method="default",  # "discrete": nearest-cell sampling (rtdetrv2_*_dsp configs)
        query_select_method="default",
    ),
    criterion=L(RTDETRCriterion)(
        matcher=L(RTDETRHungarianMatcher)(
            weight_dict={"cost_class": 2, "cost_bbox": 5, "cost_giou": 2},
            use_focal_loss=True,
            alpha=0.25,
            gamma=2.0,
        ),
        weight_dict={"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2},
        losses=["vfl", "boxes"],
        alpha=0.75,
        gamma=2.0,
        num_classes="${..decoder.num_classes}",
        boxes_weight_format=None,
        share_matched_indices=False,
    ),
    postprocessor=L(RTDETRPostProcessor)(
        num_classes="${..decoder.num_classes}",
        use_focal_loss=True,
        num_top_queries=300,
        remap_mscoco_category=False,
    ),
    pixel_mean=[0.0, 0.0, 0.0],
    pixel_std=[255.0, 255.0, 255.0],
    size_divisibility=32,
    eval_all_layers=False,  # True: run every decoder layer in eval (predictions still from eval_idx)
)
