"""MGD + TPRD, DAB-DETR R50 -> R18, synthetic.

The baseline ``../MGD/dab_detr_r50_distill_r18_synthetic.py`` plus the stand-alone TPRD method ``tprd_kd``
(``configs/common/tprd_kd.py``).

How TPRD is added: see ``dab_detr_r50_distill_r18_50ep.py``, the COCO config of this folder.
"""
from tprd.config import get_config

from ..MGD.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
