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
from .ms_deform_attn import (  # noqa: F401
    MultiScaleDeformableAttention,
    available_msda_backends,
    get_msda_backend,
    msda_function,
    msda_pytorch,
    multi_scale_deformable_attention,
    register_msda_backend,
    set_msda_backend,
)
