"""FGD + TPRD, DINO (4-scale) R50 -> R18, VOC.

The baseline ``../FGD/dino_r50_distill_r18_4scale_12ep_voc.py`` plus the stand-alone TPRD method ``tprd_kd``
(``configs/common/tprd_kd.py``).

How TPRD is added: see ``dino_r50_distill_r18_4scale_12ep.py``, the COCO config of this folder.
"""
from tprd.config import get_config

from ..FGD.dino_r50_distill_r18_4scale_12ep_voc import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
