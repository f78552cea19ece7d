"""Building blocks shared by the detectors."""
from .box_ops import (  # noqa: F401
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_box_iou,
    paired_generalized_box_iou,
)
