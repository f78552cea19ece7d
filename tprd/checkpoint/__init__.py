"""Checkpoints: reading and checked loading of state dicts, the per-detector detrex adapters
(:mod:`tprd.checkpoint.detrex`), init-file policies, merging and the student's extraction."""
from .state_dict import (  # noqa: F401
    CheckpointMismatchError,
    LoadReport,
    compare_state_dict,
    load_state_dict_checked,
    load_torchvision_backbone,
    read_checkpoint,
)
from .detrex import load_detrex_checkpoint  # noqa: F401
from .files import CheckpointFileError, check_weight_file, read_weight_file  # noqa: F401
from .loading import MIN_LOADED_FRACTION, describe_state_dict, load_init_state_dict  # noqa: F401
from .rtdetr import load_rtdetr_checkpoint, read_rtdetr_checkpoint  # noqa: F401
