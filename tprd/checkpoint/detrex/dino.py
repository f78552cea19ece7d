"""The detrex adapter of DINO (its transformer layers are named as Deformable DETR's)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from tprd.modeling.detector import PIXEL_MEAN, PIXEL_STD
from tprd.modeling.dino import DINO, DINOCriterion, DINOTransformer, DINOTransformerDecoder, DINOTransformerEncoder
from tprd.modeling.outputs import DetectorOutputs

from .common import (
    DetrexAdapter,
    build_backbone,
    build_matcher,
    build_neck,
    build_position_embedding,
    check_focal_loss,
    convert_with_aliases,
    expand_to_detrex,
    layer_kwargs,
)
from .deformable_detr import deformable_alias_target, deformable_detrex_names, deformable_detrex_to_ours

__all__ = ["DINOAdapter"]


class DINOAdapter(DetrexAdapter):
    """DINO <-> detrex ``DINO``: per-stage heads always; detrex saves the heads again as
    ``transformer.decoder.{class,bbox}_embed.*``, which collapse onto ``{class,bbox}_embed.*``."""

    name = "DINO"
    model_class = DINO
    signature = r"^label_enc\."

    def build(self, cfg: Mapping[str, Any]) -> DINO:
        return self.model_class(**_parse_detrex_config(cfg))

    def key_map(self, keys: Sequence[str]) -> Dict[str, str]:
        return {k: deformable_detrex_to_ours(k, True) or deformable_alias_target(k, True) for k in keys}

    def to_ours(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return convert_with_aliases(state_dict, lambda k: deformable_detrex_to_ours(k, True),
                                    lambda k: deformable_alias_target(k, True))

    def to_detrex(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return expand_to_detrex(
            state_dict, lambda k: deformable_detrex_names(k, True, 0, ("class_embed", "bbox_embed")))

    def parity_intermediates(self, model: nn.Module, outputs: DetectorOutputs) -> Dict[str, Any]:
        taps, main, enc = outputs.taps, outputs.main, outputs.enc
        refined = torch.cat([main.references[1:], taps["next_reference"][None]], 0)
        return {
            "backbone": taps["backbone"],
            "neck": taps["neck"],
            "masks": taps["neck_masks"],
            "transformer_outputs": (main.hidden, main.references[0], refined, enc["hidden"], enc["pred_boxes"]),
            "enc_outputs_class_all_tokens": enc["all_token_logits"],
            "enc_topk_proposals": enc["topk_indices"],
        }


# ============================================================================================
# detrex config -> constructor arguments
# ============================================================================================

def _build_transformer(cfg: Mapping[str, Any]) -> DINOTransformer:
    enc_cfg, dec_cfg = cfg["encoder"], cfg["decoder"]
    encoder = DINOTransformerEncoder(**layer_kwargs(enc_cfg),
                                     post_norm=bool(enc_cfg.get("post_norm", False)))
    decoder = DINOTransformerDecoder(**layer_kwargs(dec_cfg),
                                     return_intermediate=bool(dec_cfg.get("return_intermediate", True)),
                                     look_forward_twice=bool(dec_cfg.get("look_forward_twice", True)))
    return DINOTransformer(
        encoder, decoder,
        num_feature_levels=int(cfg.get("num_feature_levels", 4)),
        two_stage_num_proposals=int(cfg.get("two_stage_num_proposals", 900)),
        learnt_init_query=bool(cfg.get("learnt_init_query", True)),
    )


def _build_criterion(cfg: Optional[Mapping[str, Any]]) -> Optional[DINOCriterion]:
    if not cfg:
        return None
    check_focal_loss(cfg)
    if list(cfg.get("losses", ["class", "boxes"])) != ["class", "boxes"]:
        raise ValueError(f"DINOCriterion computes the 'class' and 'boxes' losses; got losses={cfg.get('losses')}")
    matcher = build_matcher(cfg.get("matcher"))
    return DINOCriterion(
        num_classes=int(cfg["num_classes"]), matcher=matcher, weight_dict=dict(cfg.get("weight_dict", {})),
        alpha=float(cfg.get("alpha", 0.25)), gamma=float(cfg.get("gamma", 2.0)),
        two_stage_binary_cls=bool(cfg.get("two_stage_binary_cls", False)),
    )


def _parse_detrex_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    return dict(
        backbone=build_backbone(cfg["backbone"]),
        position_embedding=build_position_embedding(cfg["position_embedding"]),
        neck=build_neck(cfg["neck"]),
        transformer=_build_transformer(cfg["transformer"]),
        embed_dim=int(cfg.get("embed_dim", 256)),
        num_classes=int(cfg["num_classes"]),
        num_queries=int(cfg["num_queries"]),
        criterion=_build_criterion(cfg.get("criterion")),
        pixel_mean=list(cfg.get("pixel_mean", PIXEL_MEAN)),
        pixel_std=list(cfg.get("pixel_std", PIXEL_STD)),
        aux_loss=bool(cfg.get("aux_loss", True)),
        select_box_nums_for_evaluation=int(cfg.get("select_box_nums_for_evaluation", 300)),
        dn_number=int(cfg.get("dn_number", 100)),
        label_noise_ratio=float(cfg.get("label_noise_ratio", 0.2)),
        box_noise_scale=float(cfg.get("box_noise_scale", 1.0)),
        use_checkpoint=bool(cfg.get("use_checkpoint", False)),
        msda_backend=cfg.get("msda_backend"),
        device=cfg.get("device"),
        input_format=cfg.get("input_format", "RGB"),
        vis_period=int(cfg.get("vis_period", 0)),
    )
