"""Training engine: launch, trainer + hooks, checkpointing, optimizer groups, the shared entry point.

>>> from tprd.engine import default_argument_parser, launch, main
"""
from . import comm
from .checkpoint import DetectionCheckpointer
from .defaults import default_argument_parser, default_setup, setup_logger
from .ema import EMAHook, ModelEMA
from .events import CommonMetricPrinter, EventStorage, JSONWriter, TensorboardXWriter, get_event_storage
from .launch import launch
from .lr_scheduler import LRMultiplier, WarmupParamScheduler
from .optim import backbone_lr_factor, deformable_lr_factor, get_default_optimizer_params
from .trainer import AMPTrainer, HookBase, SimpleTrainer, TrainerBase, create_ddp_model

__all__ = [
    "comm",
    "DetectionCheckpointer",
    "default_argument_parser",
    "default_setup",
    "setup_logger",
    "EMAHook",
    "ModelEMA",
    "CommonMetricPrinter",
    "EventStorage",
    "JSONWriter",
    "TensorboardXWriter",
    "get_event_storage",
    "launch",
    "LRMultiplier",
    "WarmupParamScheduler",
    "backbone_lr_factor",
    "deformable_lr_factor",
    "get_default_optimizer_params",
    "AMPTrainer",
    "HookBase",
    "SimpleTrainer",
    "TrainerBase",
    "create_ddp_model",
]
