"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import D3ETR, FGD, MGD, TPRDKD, DETRDistill, DistillMethod, FitNet, KDDETR

__all__ = ["Distiller", "DistillMethod", "DETRDistill", "KDDETR", "D3ETR", "FGD", "FitNet", "MGD", "TPRDKD"]
