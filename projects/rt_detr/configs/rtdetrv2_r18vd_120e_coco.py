"""RT-DETRv2-S: R18vd, 3 decoder layers (official ``rtdetrv2_r18vd_120e_coco.yml``; 48.1 AP released).

Model settings only; the official training recipe (AdamW 1e-4, backbone x0.1, EMA, AMP, multi-scale
480-800, augmentation stop epoch) is not part of this config yet. Official weights load with
``tprd.checkpoint.load_rtdetr_checkpoint`` (``rtdetrv2_r18vd_120e_coco_rerun_48.1.pth``).
"""
from .models.rtdetrv2_r18vd import model  # noqa: F401
