"""RT-DETRv2's adapter: its official checkpoints (lyuwenyu/RT-DETR) already use our key names.

RT-DETR is not a detrex detector; it joins the registry so that every consumer (init files,
``merge_weight.py``, student extraction, checkpoint descriptions) finds it the same way. Keys map
one to one; the official files nest the weights as ``ema.module`` (preferred) or ``model``
(docs/rt_detr.md).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import Tensor, nn

from tprd.modeling.rt_detr import RTDETR

from ..rtdetr import read_rtdetr_checkpoint
from .common import DetrexAdapter


class RTDETRAdapter(DetrexAdapter):
    model_class = RTDETR
    name = "RT-DETR"
    signature = r"^(decoder\.)?(dec_score_head|enc_score_head)\."
    official_naming_is_ours = True

    def build(self, cfg: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError("RT-DETR models are built from projects/rt_detr/configs/ (no detrex config exists); "
                                  "its parity fixtures go through tprd.testing.rtdetr_parity")

    def to_ours(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return dict(state_dict)

    def to_detrex(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return dict(state_dict)

    def read(self, source: Any) -> Dict[str, Tensor]:
        return read_rtdetr_checkpoint(source)
