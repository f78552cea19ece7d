"""The detrex adapter of Deformable DETR, and the deformable-transformer key rules DINO shares.

detrex names the layers of its deformable transformer ``attentions.k``, ``ffns.0.layers.*`` and
``norms.k``; ours are ``self_attn``, ``cross_attn``, ``ffn.linear1/2`` and ``norm1..3``
(:func:`deformable_detrex_to_ours`, and back :func:`deformable_ours_to_detrex`). Heads that detrex
shares between stages (no box refinement) are stored by detrex once per stage and by us once
(``class_embed.0``, ``bbox_embed.0``); the heads detrex hands to its decoder are saved again under
``transformer.decoder.`` (:func:`deformable_alias_target`, :func:`deformable_detrex_names`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import Tensor, nn

from tprd.modeling.criterion import SetCriterion
from tprd.modeling.deformable_detr import (
    DeformableDETR,
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerEncoder,
)
from tprd.modeling.detector import PIXEL_MEAN, PIXEL_STD
from tprd.modeling.outputs import DetectorOutputs

from .common import (
    DetrexAdapter,
    backbone_key_to_detrex,
    build_backbone,
    build_matcher,
    build_neck,
    build_position_embedding,
    check_focal_loss,
    config_target,
    convert_backbone_key,
    convert_with_aliases,
    expand_to_detrex,
    layer_kwargs,
)

__all__ = [
    "DeformableDETRAdapter",
    "deformable_detrex_to_ours",
    "deformable_alias_target",
    "deformable_ours_to_detrex",
    "deformable_detrex_names",
]


# ============================================================================================
# Deformable transformer keys: detrex -> ours
# ============================================================================================

_ENC_LAYER = re.compile(r"^(transformer\.encoder\.layers\.\d+\.)(.*)$")  # (layer prefix, the part renamed)
_DEC_LAYER = re.compile(r"^(transformer\.decoder\.layers\.\d+\.)(.*)$")
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_FFN = {"ffns.0.layers.0.0.": "ffn.linear1.", "ffns.0.layers.1.": "ffn.linear2."}
_ENC_TABLE = {"attentions.0.": "self_attn.", "norms.0.": "norm1.", "norms.1.": "norm2."}
_DEC_TABLE = {"attentions.0.attn.": "self_attn.", "attentions.1.": "cross_attn.",
              "norms.0.": "norm1.", "norms.1.": "norm2.", "norms.2.": "norm3."}


def _rename_layer_part(rest: str, table: Dict[str, str]) -> str:
    for old, new in list(table.items()) + list(_FFN.items()):
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(rest)


def deformable_detrex_to_ours(key: str, per_stage_heads: bool) -> Optional[str]:
    """Our name of a detrex Deformable DETR / DINO key, or ``None`` for an alias of a shared tensor
    (``transformer.decoder.{class,bbox}_embed.*``; without ``per_stage_heads`` also the head copies
    ``{class,bbox}_embed.k``, ``k > 0``)."""
    if key.startswith("backbone."):
        return convert_backbone_key(key)
    renamed = _rename_transformer_key(key, back=False)
    if renamed is not None:
        return renamed
    if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
        return None
    m = _HEAD.match(key)
    if m and not per_stage_heads:
        return f"{m.group(1)}.0.{m.group(3)}" if m.group(2) == "0" else None
    return key


def deformable_alias_target(key: str, per_stage_heads: bool) -> str:
    """Our key holding the tensor that the dropped detrex alias ``key`` duplicates."""
    if key.startswith("transformer.decoder."):
        key = key[len("transformer.decoder."):]
    m = _HEAD.match(key)
    if m is None:
        raise KeyError(key)
    return key if per_stage_heads else f"{m.group(1)}.0.{m.group(3)}"


# ============================================================================================
# Deformable transformer keys, the way back: ours -> detrex (each the inverse of the rule above)
# ============================================================================================

def _invert(table: Dict[str, str]) -> Dict[str, str]:
    return {new: old for old, new in table.items()}


def _rename_layer_part_back(rest: str, table: Dict[str, str]) -> str:
    for ours, detrex in list(_invert(table).items()) + list(_invert(_FFN).items()):
        if rest.startswith(ours):
            return detrex + rest[len(ours):]
    raise KeyError(rest)


def deformable_ours_to_detrex(key: str) -> str:
    """The detrex name of our Deformable DETR / DINO key (the inverse of
    :func:`deformable_detrex_to_ours` on the keys it keeps)."""
    if key.startswith("backbone."):
        return backbone_key_to_detrex(key)
    renamed = _rename_transformer_key(key, back=True)
    return key if renamed is None else renamed


def _rename_transformer_key(key: str, back: bool) -> Optional[str]:
    """A key of an encoder/decoder layer or of the encoder's final norm, renamed detrex -> ours
    (``back``: ours -> detrex); ``None`` for any other key. Layer indices keep their place."""
    for pattern, table in ((_ENC_LAYER, _ENC_TABLE), (_DEC_LAYER, _DEC_TABLE)):
        m = pattern.match(key)
        if m:
            rest = _rename_layer_part_back(m.group(2), table) if back else _rename_layer_part(m.group(2), table)
            return m.group(1) + rest
    detrex_norm, our_norm = "transformer.encoder.post_norm_layer.", "transformer.encoder.norm."
    src, dst = (our_norm, detrex_norm) if back else (detrex_norm, our_norm)
    return dst + key[len(src):] if key.startswith(src) else None


def deformable_detrex_names(key: str, per_stage_heads: bool, num_pred: int,
                            decoder_heads: Sequence[str]) -> List[str]:
    """Every detrex key that holds our key's tensor: its detrex name, then the aliases detrex saves
    too -- without ``per_stage_heads`` the shared head ``{class,bbox}_embed.0`` as
    ``{class,bbox}_embed.k`` for ``k < num_pred``; the heads named in ``decoder_heads``
    (``"class_embed"``, ``"bbox_embed"``: those detrex hands to its decoder) again under
    ``transformer.decoder.``."""
    m = _HEAD.match(key)
    if m is None:
        return [deformable_ours_to_detrex(key)]
    head, index, rest = m.groups()
    names = [key] if per_stage_heads else [f"{head}.{k}.{rest}" for k in range(num_pred)]
    if head in decoder_heads:
        names += [f"transformer.decoder.{n}" for n in names]
    return names


# ============================================================================================
# The adapter
# ============================================================================================


class DeformableDETRAdapter(DetrexAdapter):
    """Deformable DETR (plain, box refinement, two-stage) <-> detrex ``DeformableDETR``."""

    name = "Deformable DETR"
    model_class = DeformableDETR
    signature = r"^(query_embedding|transformer\.level_embeds|transformer\.reference_points|transformer\.enc_output)"

    def build(self, cfg: Mapping[str, Any]) -> DeformableDETR:
        return self.model_class(**_parse_detrex_config(cfg))

    def key_map(self, keys: Sequence[str]) -> Dict[str, str]:
        keys = list(keys)
        refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
        return {k: deformable_detrex_to_ours(k, refine) or deformable_alias_target(k, refine) for k in keys}

    def to_ours(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Box refinement is read from the keys (``transformer.decoder.bbox_embed.*``)."""
        refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state_dict)
        return convert_with_aliases(
            state_dict,
            lambda k: deformable_detrex_to_ours(k, refine),
            lambda k: deformable_alias_target(k, refine),
            hint=" (shared between stages); was the checkpoint made with a different with_box_refine?",
        )

    def to_detrex(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Read from the keys: box refinement (per-stage heads, ``bbox_embed.1.*``; a one-layer
        decoder without two-stage counts as without), two-stage (``transformer.enc_output.*``) and
        the number of decoder layers."""
        layers = {int(k.split(".")[3]) for k in state_dict if k.startswith("transformer.decoder.layers.")}
        two_stage = any(k.startswith("transformer.enc_output.") for k in state_dict)
        refine = any(k.startswith("bbox_embed.1.") for k in state_dict)
        num_pred = len(layers) + int(two_stage)
        decoder_heads = (("bbox_embed",) if refine else ()) + (("class_embed",) if two_stage else ())
        return expand_to_detrex(state_dict, lambda k: deformable_detrex_names(k, refine, num_pred, decoder_heads))

    def parity_intermediates(self, model: nn.Module, outputs: DetectorOutputs) -> Dict[str, Any]:
        taps = outputs.taps
        main = outputs.main
        if model.with_box_refine:  # each layer's output box is the next layer's reference
            refs_after = main.boxes.detach()
        else:
            refs_after = main.references
        enc = outputs.enc
        return {
            "backbone": taps["backbone"],
            "neck": taps["neck"],
            "masks": taps["neck_masks"],
            "transformer_outputs": (
                main.hidden,
                main.references[0],
                refs_after,
                enc["pred_logits"] if enc else None,
                enc["pred_boxes_unact"] if enc else None,
            ),
        }

    def describe(self, joined_keys: str) -> str:
        two_stage = re.search(r"^transformer\.(pos_trans|enc_output)", joined_keys, re.M)
        return self.name + (" (two-stage)" if two_stage else "")


# ============================================================================================
# detrex config -> constructor arguments
# ============================================================================================


def _build_transformer(cfg: Mapping[str, Any]) -> DeformableTransformer:
    enc_cfg, dec_cfg = cfg["encoder"], cfg["decoder"]
    encoder = DeformableTransformerEncoder(**layer_kwargs(enc_cfg),
                                           post_norm=bool(enc_cfg.get("post_norm", False)))
    decoder = DeformableTransformerDecoder(**layer_kwargs(dec_cfg),
                                           return_intermediate=bool(dec_cfg.get("return_intermediate", True)))
    return DeformableTransformer(
        encoder, decoder,
        as_two_stage=bool(cfg.get("as_two_stage", False)),
        num_feature_levels=int(cfg.get("num_feature_levels", 4)),
        two_stage_num_proposals=int(cfg.get("two_stage_num_proposals", 300)),
    )


def _build_criterion(cfg: Optional[Mapping[str, Any]], two_stage: bool) -> Optional[SetCriterion]:
    if not cfg:
        return None
    check_focal_loss(cfg)
    matcher = build_matcher(cfg.get("matcher"))
    # detrex's DeformableCriterion supervises two-stage proposals as a single class
    binary = bool(cfg.get("two_stage_binary_cls", "DeformableCriterion" in config_target(cfg)))
    return SetCriterion(
        num_classes=int(cfg["num_classes"]), matcher=matcher, weight_dict=dict(cfg.get("weight_dict", {})),
        alpha=float(cfg.get("alpha", 0.25)), gamma=float(cfg.get("gamma", 2.0)), two_stage_binary_cls=binary,
    )


def _parse_detrex_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    two_stage = bool(cfg.get("as_two_stage", False))
    return dict(
        backbone=build_backbone(cfg["backbone"]),
        position_embedding=build_position_embedding(cfg["position_embedding"]),
        neck=build_neck(cfg["neck"]),
        transformer=_build_transformer(cfg["transformer"]),
        num_classes=int(cfg["num_classes"]),
        num_queries=int(cfg["num_queries"]),
        criterion=_build_criterion(cfg.get("criterion"), two_stage),
        pixel_mean=list(cfg.get("pixel_mean", PIXEL_MEAN)),
        pixel_std=list(cfg.get("pixel_std", PIXEL_STD)),
        embed_dim=int(cfg.get("embed_dim", 256)),
        aux_loss=bool(cfg.get("aux_loss", True)),
        with_box_refine=bool(cfg.get("with_box_refine", False)),
        as_two_stage=two_stage,
        select_box_nums_for_evaluation=int(cfg.get("select_box_nums_for_evaluation", 100)),
        use_checkpoint=bool(cfg.get("use_checkpoint", False)),
        msda_backend=cfg.get("msda_backend"),
        device=cfg.get("device"),
    )
