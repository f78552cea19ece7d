"""RT-DETRv2-L: R50vd, 6 decoder layers (official ``rtdetrv2_r50vd_6x_coco.yml``).

Model settings only (see ``rtdetrv2_r18vd_120e_coco.py``); weights ``rtdetrv2_r50vd_6x_coco_ema.pth``.
"""
from .models.rtdetrv2_r50vd import model  # noqa: F401
