"""Detectors, matcher, criterion and post-processing."""
from .criterion import SetCriterion, get_num_boxes, loss_boxes, loss_labels, sigmoid_focal_loss  # noqa: F401
from .dab_detr import DABDETR  # noqa: F401
from .deformable_detr import DeformableDETR, DeformableTransformer  # noqa: F401
from .detector import DETRDetector, MultiScaleDETRDetector  # noqa: F401
from .dino import DINO  # noqa: F401
from .matcher import HungarianMatcher  # noqa: F401
from .rt_detr import RTDETR  # noqa: F401
from .postprocess import detector_postprocess, postprocess, select_topk  # noqa: F401
