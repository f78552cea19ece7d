"""Distillation methods: small plug-ins for :class:`tprd.distill.Distiller`."""
from .base import DistillContext, DistillMethod, query_group_from_tap
from .crosskd import CrossKD
from .d3detr import D3DETR
from .detrdistill import DETRDistill
from .fgd import FGD
from .fitnet import FitNet
from .kd_detr import KDDETR
from .mgd import MGD
from .qskd import QSKD
from .tprd_kd import TPRDKD

__all__ = ["DistillContext", "DistillMethod", "query_group_from_tap", "DETRDistill", "KDDETR", "D3DETR", "QSKD",
           "CrossKD", "FGD", "FitNet", "MGD", "TPRDKD"]
