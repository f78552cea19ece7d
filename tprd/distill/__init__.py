"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import CrossKD, D3ETR, DETRDistill, DistillMethod, KDDETR, QSKD

__all__ = ["Distiller", "DistillMethod", "CrossKD", "D3ETR", "DETRDistill", "KDDETR", "QSKD"]
