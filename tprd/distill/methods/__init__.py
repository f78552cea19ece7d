"""Distillation methods: small plug-ins for :class:`tprd.distill.Distiller`."""
from .base import DistillContext, DistillMethod, query_group_from_tap
from .crosskd import CrossKD
from .d3detr import D3ETR
from .detrdistill import DETRDistill
from .kd_detr import KDDETR
from .qskd import QSKD

__all__ = [
    "DistillContext", "DistillMethod", "query_group_from_tap", "CrossKD", "D3ETR", "DETRDistill", "KDDETR", "QSKD",
]
