"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import FGD, MGD, QSKD, TPRDKD, CrossKD, D3ETR, DETRDistill, DistillMethod, FitNet, KDDETR

__all__ = ["Distiller", "DistillMethod", "DETRDistill", "KDDETR", "D3ETR", "QSKD", "CrossKD", "FGD", "FitNet", "MGD",
           "TPRDKD"]
