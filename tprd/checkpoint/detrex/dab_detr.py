"""The detrex adapter of DAB-DETR.

Key renaming (detrex -> ours): backbone keys as for every ResNet (:func:`convert_backbone_key`);
transformer layers ``attentions.0/1`` -> ``self_attn``/``cross_attn``, ``norms.k`` -> ``norm{k+1}``,
``ffns.0.layers.0.0/0.1/1`` -> ``ffn.linear1/activation/linear2``, encoder ``attentions.0.attn`` ->
``self_attn``. Aliases of one shared tensor in detrex (``transformer.decoder.bbox_embed.*`` =
``bbox_embed.*``; ``ffns.0.activation`` = ``ffns.0.layers.0.1``) collapse to one key; differing
values raise ``ValueError``.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

from torch import Tensor, nn

from tprd.config import locate
from tprd.modeling.criterion import SetCriterion
from tprd.modeling.dab_detr import (
    DABDETR,
    DabDetrTransformer,
    DabDetrTransformerDecoder,
    DabDetrTransformerEncoder,
)
from tprd.modeling.detector import PIXEL_MEAN, PIXEL_STD
from tprd.modeling.outputs import DetectorOutputs

from .common import (
    DetrexAdapter,
    backbone_key_to_detrex,
    build_backbone,
    build_matcher,
    build_position_embedding,
    check_focal_loss,
    config_target,
    convert_backbone_key,
    convert_with_aliases,
    expand_to_detrex,
)

__all__ = ["DABDETRAdapter"]


class DABDETRAdapter(DetrexAdapter):
    """DAB-DETR <-> detrex ``DABDETR`` (single-scale, res5 only)."""

    name = "DAB-DETR"
    model_class = DABDETR
    signature = r"^(anchor_box_embed|refpoint_embed)\."

    def build(self, cfg: Mapping[str, Any]) -> DABDETR:
        return _from_detrex_config(self.model_class, cfg)

    def to_ours(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return convert_with_aliases(state_dict, _rename_detrex_key)

    def to_detrex(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return expand_to_detrex(state_dict, _detrex_names)

    def parity_intermediates(self, model: nn.Module, outputs: DetectorOutputs) -> Dict[str, Any]:
        taps = outputs.taps
        return {
            "backbone": taps["backbone"],
            "input_proj": taps["neck"][0],
            "masks": taps["neck_masks"],
            "transformer_outputs": (outputs.main.hidden, outputs.main.references),
        }


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------
_DETREX_RULES = [
    (re.compile(r"^transformer\.decoder\.bbox_embed\."), "bbox_embed."),
    (re.compile(r"^(transformer\.encoder\.layers\.\d+\.)attentions\.0\.attn\."), r"\1self_attn."),
    (re.compile(r"^(transformer\.decoder\.layers\.\d+\.)attentions\.0\."), r"\1self_attn."),
    (re.compile(r"^(transformer\.decoder\.layers\.\d+\.)attentions\.1\."), r"\1cross_attn."),
    (re.compile(r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)ffns\.0\.layers\.0\.0\."), r"\1ffn.linear1."),
    (re.compile(r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)ffns\.0\.layers\.0\.1\."), r"\1ffn.activation."),
    (re.compile(r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)ffns\.0\.activation\."), r"\1ffn.activation."),
    (re.compile(r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)ffns\.0\.layers\.1\."), r"\1ffn.linear2."),
]
_NORM_RULE = re.compile(r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)norms\.(\d+)\.")


def _rename_detrex_key(key: str) -> str:
    if key.startswith("backbone."):
        return convert_backbone_key(key)
    for pattern, repl in _DETREX_RULES:
        if pattern.search(key):
            return pattern.sub(repl, key, count=1)
    m = _NORM_RULE.search(key)
    if m:
        return f"{m.group(1)}norm{int(m.group(2)) + 1}." + key[m.end():]
    return key


# ours -> detrex: each rule the inverse of one above; a rule may give several names (aliases)
_LAYER = r"^(transformer\.(?:en|de)coder\.layers\.\d+\.)"
_OURS_RULES = [
    (re.compile(r"^bbox_embed\."), ["bbox_embed.", "transformer.decoder.bbox_embed."]),
    (re.compile(r"^(transformer\.encoder\.layers\.\d+\.)self_attn\."), [r"\1attentions.0.attn."]),
    (re.compile(r"^(transformer\.decoder\.layers\.\d+\.)self_attn\."), [r"\1attentions.0."]),
    (re.compile(r"^(transformer\.decoder\.layers\.\d+\.)cross_attn\."), [r"\1attentions.1."]),
    (re.compile(_LAYER + r"ffn\.linear1\."), [r"\1ffns.0.layers.0.0."]),
    (re.compile(_LAYER + r"ffn\.activation\."), [r"\1ffns.0.layers.0.1.", r"\1ffns.0.activation."]),
    (re.compile(_LAYER + r"ffn\.linear2\."), [r"\1ffns.0.layers.1."]),
]
_OURS_NORM = re.compile(_LAYER + r"norm(\d+)\.")


def _detrex_names(key: str) -> List[str]:
    if key.startswith("backbone."):
        return [backbone_key_to_detrex(key)]
    for pattern, repls in _OURS_RULES:
        if pattern.search(key):
            return [pattern.sub(r, key, count=1) for r in repls]
    m = _OURS_NORM.search(key)
    if m:
        return [f"{m.group(1)}norms.{int(m.group(2)) - 1}." + key[m.end():]]
    return [key]


# ------------------------------------------------------------------------------------------------
# detrex config -> model
# ------------------------------------------------------------------------------------------------
def _activation_from_config(node: Optional[Mapping[str, Any]]) -> nn.Module:
    if node is None:
        return nn.PReLU()
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    return locate(config_target(node))(**kwargs)


def _from_detrex_config(cls, cfg: Mapping[str, Any]) -> DABDETR:
    backbone = build_backbone(cfg["backbone"], default_out_features=("res2", "res3", "res4", "res5"), allow_bn=True)
    position_embedding = build_position_embedding(cfg["position_embedding"], strict=True)
    tr = cfg["transformer"]
    if int(tr.get("num_patterns", 0)) != 0:
        raise ValueError("DAB-DETR with num_patterns > 0 (Anchor-DETR patterns) is not supported")
    enc = dict(tr["encoder"])
    dec = dict(tr["decoder"])
    for d in (enc, dec):
        d.pop("_target_", None)
        d["activation"] = _activation_from_config(d.get("activation"))
        if d.pop("batch_first", False):
            raise ValueError("batch_first is an implementation detail of detrex; leave it unset")
        d.pop("operation_order", None)
    transformer = DabDetrTransformer(DabDetrTransformerEncoder(**enc), DabDetrTransformerDecoder(**dec))
    criterion = _criterion_from_config(cfg.get("criterion"), aux_loss=bool(cfg.get("aux_loss", True)))
    return cls(
        backbone=backbone,
        transformer=transformer,
        position_embedding=position_embedding,
        num_classes=int(cfg["num_classes"]),
        num_queries=int(cfg["num_queries"]),
        criterion=criterion,
        in_features=list(cfg.get("in_features", ["res5"])),
        in_channels=int(cfg.get("in_channels", 2048)),
        embed_dim=int(cfg.get("embed_dim", 256)),
        aux_loss=bool(cfg.get("aux_loss", True)),
        pixel_mean=list(cfg.get("pixel_mean", PIXEL_MEAN)),
        pixel_std=list(cfg.get("pixel_std", PIXEL_STD)),
        freeze_anchor_box_centers=bool(cfg.get("freeze_anchor_box_centers", True)),
        select_box_nums_for_evaluation=int(cfg.get("select_box_nums_for_evaluation", 300)),
        use_checkpoint=bool(cfg.get("use_checkpoint", False)),
    )


def _criterion_from_config(node: Optional[Mapping[str, Any]], aux_loss: bool = True):
    """detrex ``SetCriterion`` + ``HungarianMatcher`` config (focal cost / focal loss) -> ours."""
    if node is None:
        return None
    check_focal_loss(node)
    return SetCriterion(
        num_classes=int(node["num_classes"]),
        matcher=build_matcher(node["matcher"]),
        weight_dict=dict(node.get("weight_dict", {})),
        alpha=float(node.get("alpha", 0.25)),
        gamma=float(node.get("gamma", 2.0)),
        aux_loss=aux_loss,
    )
