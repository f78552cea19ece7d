"""Checkpoint conversion and loading: detrex and RT-DETR checkpoints, torchvision backbones, parity fill."""
from .detrex import (  # noqa: F401
    CheckpointMismatchError,
    LoadReport,
    compare_state_dict,
    load_detrex_checkpoint,
    load_state_dict_checked,
    load_torchvision_backbone,
    read_checkpoint,
)
from .files import CheckpointFileError, check_weight_file, read_weight_file  # noqa: F401
from .loading import MIN_LOADED_FRACTION, describe_state_dict, load_init_state_dict  # noqa: F401
from .fill import FILL_RULE, fill_state_dict, fill_value  # noqa: F401
from .rtdetr import fill_rtdetr_state_dict, load_rtdetr_checkpoint, read_rtdetr_checkpoint  # noqa: F401
