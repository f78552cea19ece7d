"""TPRD toolbox: knowledge distillation of DETR detectors with teacher prediction refinement."""

__version__ = "0.1.0"
