"""RT-DETRv2-M: R50vd, CSP expansion 0.5, 6 decoder layers of which inference uses the third
(``eval_idx=2``; official ``rtdetrv2_r50vd_m_7x_coco.yml``).

Model settings only (see ``rtdetrv2_r18vd_120e_coco.py``); weights ``rtdetrv2_r50vd_m_7x_coco_ema.pth``.
"""
from .models.rtdetrv2_r50vd import model

model.encoder.expansion = 0.5
model.decoder.eval_idx = 2
