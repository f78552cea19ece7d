"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import FGD, MGD, TPRDKD, DETRDistill, DistillMethod, FitNet, KDDETR

__all__ = ["Distiller", "DistillMethod", "DETRDistill", "KDDETR", "FGD", "FitNet", "MGD", "TPRDKD"]
