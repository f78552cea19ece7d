"""KD-DETR + TPRD, DAB-DETR R50 -> R18, synthetic.

The baseline ``../KD_DETR/dab_detr_r50_distill_r18_synthetic.py`` with
refine=True only (no weight change in docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dab_detr_r50_distill_r18_50ep.py``,
the COCO config of this folder.
"""
from ..KD_DETR.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
