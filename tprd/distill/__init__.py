"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import D3ETR, DETRDistill, DistillMethod, KDDETR

__all__ = ["Distiller", "DistillMethod", "DETRDistill", "KDDETR", "D3ETR"]
