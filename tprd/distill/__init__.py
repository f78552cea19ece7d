"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import CrossKD, DETRDistill, DistillMethod, KDDETR, QSKD

__all__ = ["Distiller", "DistillMethod", "CrossKD", "DETRDistill", "KDDETR", "QSKD"]
