"""Knowledge distillation of DETR detectors: the distiller, TPRD and the method plug-ins."""
from .distiller import Distiller
from .methods import FGD, MGD, QSKD, TPRDKD, CrossKD, D3DETR, DETRDistill, DistillMethod, FitNet, KDDETR

__all__ = ["Distiller", "DistillMethod", "DETRDistill", "KDDETR", "D3DETR", "QSKD", "CrossKD", "FGD", "FitNet", "MGD",
           "TPRDKD"]


def __getattr__(name: str):
    # D³ETR's class was spelled D3ETR before; the method's one ASCII name is D3DETR (its config
    # folder, loss keys and module), so the old name still works but says so.
    if name == "D3ETR":
        import warnings

        warnings.warn("tprd.distill.D3ETR is now tprd.distill.D3DETR (D³ETR's one ASCII name, as its config "
                      "folder cfg_distill/D3DETR and its loss keys distill_d3detr_*)", DeprecationWarning, stacklevel=2)
        return D3DETR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
