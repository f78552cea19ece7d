"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import DETRDistill, DistillMethod, KDDETR

__all__ = ["Distiller", "DistillMethod", "DETRDistill", "KDDETR"]
