"""FGD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#fgd)."""
from tprd.config import get_config

from ..base.rtdetrv2_r50vd_distill_r18vd_coco import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"fgd": get_config("common/feature_kd.py").fgd}  # on the hybrid encoder's 3 maps
