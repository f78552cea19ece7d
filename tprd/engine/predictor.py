"""Inference outside the training loop: the detector of a config, its weights, one image at a time.

Used by ``demo/demo.py``, ``tools/analyze_model.py`` and ``tools/export_onnx.py``. A distillation
config (``model`` is a :class:`~tprd.distill.Distiller` node with ``student`` and ``teacher``) gives
its student by default (``part="teacher"`` for the teacher); a detector config gives its model.
Weights come from a plain detector checkpoint or a distillation checkpoint (the ``student.*`` /
``teacher.*`` part is taken), in our naming or detrex's, and load strictly.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from tprd.config import instantiate

__all__ = ["detector_config", "is_distillation_config", "build_detector", "load_detector_weights",
           "class_names", "Predictor", "TensorDetector"]

logger = logging.getLogger("tprd.engine")


def is_distillation_config(cfg) -> bool:
    """``cfg.model`` holds a student and a teacher (a Distiller)."""
    model = cfg.model
    return "student" in model and "teacher" in model


def detector_config(cfg, part: str = "student"):
    """The config node of the detector to run: ``cfg.model.<part>`` of a distillation config, else
    ``cfg.model`` (``part`` must then be ``"student"``, i.e. "the model")."""
    if part not in ("student", "teacher"):
        raise ValueError(f"part must be 'student' or 'teacher', got {part!r}")
    if is_distillation_config(cfg):
        return cfg.model[part]
    if part == "teacher":
        raise ValueError("this config is a plain detector (cfg.model has no teacher); use a distillation config "
                         "for the teacher")
    return cfg.model


def build_detector(cfg, part: str = "student", device: Optional[str] = None) -> nn.Module:
    """Instantiate :func:`detector_config` on ``device`` (default ``train.device``), in eval mode."""
    from .setup_checks import _device

    node = detector_config(cfg, part)
    dev = torch.device(device) if device else _device(cfg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available; pass train.device=cpu")
    return instantiate(node).to(dev).eval()


def load_detector_weights(model: nn.Module, path: str, part: str = "student") -> None:
    """Load ``path`` into the detector ``model`` strictly: a plain detector checkpoint (ours, detrex's,
    or nested as the detector family's released files: RT-DETR's ``ema/module`` first) or the
    ``<part>.*`` weights of a distillation checkpoint. Raises naming the file and the fix."""
    from tprd.checkpoint import load_state_dict_checked, read_checkpoint, read_weight_file
    from tprd.checkpoint.detrex import adapter_for
    from tprd.checkpoint.student import is_detrex_naming

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass train.init_checkpoint=<model .pth file>")
    weights = read_checkpoint(read_weight_file(path))
    prefix = f"{part}."
    if any(k.startswith(("student.", "teacher.")) for k in weights):
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"checkpoint {path!r} is a distillation checkpoint without '{prefix}*' keys")
    elif adapter_for(model, default=None) is not None:
        weights = adapter_for(model).read(path)  # the family's nesting (RT-DETR: ema/module before model)
    if is_detrex_naming(weights):
        weights = adapter_for(model).to_ours(weights)
    report = load_state_dict_checked(model, weights, strict=True, source=path)
    logger.info(report.summary())


def class_names(cfg, num_classes: Optional[int] = None) -> List[str]:
    """``thing_classes`` of the config's test dataset (the first name), else ``class 0 ..``."""
    try:
        from tprd.data import MetadataCatalog

        names = cfg.dataloader.test.dataset.names
        name = names if isinstance(names, str) else list(names)[0]
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes:
            return list(classes)
    except Exception:  # no test dataset in the config: numbered classes
        pass
    return [f"class {i}" for i in range(int(num_classes or 0))]


class Predictor:
    """``predictor(image)`` -> ``{"boxes" [N,4] xyxy pixels of the original image, "scores" [N],
    "labels" [N]}`` for one uint8 ``[3,H,W]`` RGB image or an image path, through the config's test
    resize (``dataloader.test.mapper``) and the detector in eval mode."""

    def __init__(self, cfg, model: nn.Module):
        self.cfg = cfg
        self.model = model.eval()
        test = cfg.dataloader.get("test") if "dataloader" in cfg else None
        mapper = test.get("mapper") if test is not None else None
        self.mapper = instantiate(mapper) if mapper is not None else None  # None: images as they are

    def prepare(self, image: Any) -> Dict[str, Any]:
        """The model input of one image (a path or a uint8 ``[3,H,W]`` tensor)."""
        from tprd.data.datasets import read_image

        if not isinstance(image, Tensor):
            path = str(image)
            image = read_image(path)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        resize = getattr(self.mapper, "transform", None)
        if resize is not None:
            from torchvision import tv_tensors

            image = resize(tv_tensors.Image(image)).as_subclass(Tensor).contiguous()
        return {"image": image, "height": h, "width": w}

    @torch.no_grad()
    def __call__(self, image: Any) -> Dict[str, Tensor]:
        out = self.model([self.prepare(image)])[0]
        return {k: v.cpu() for k, v in out.items()}


class TensorDetector(nn.Module):
    """A detector as a function of one image tensor, for tracing (FLOP counts, ONNX export).

    ``forward(images)``: ``images [B,3,H,W]`` float RGB in 0..255, all of one size (no padding) ->
    ``scores [B,Q,C]`` (sigmoid class scores of the final stage) and ``boxes [B,Q,4]`` (its boxes,
    ``x0, y0, x1, y1`` in pixels of ``images``). Top-k selection and thresholds stay outside.
    RT-DETR: the final stage is ``eval_idx`` (what its ``inference`` uses); the images are padded
    bottom/right to a multiple of 32 (its FPN needs it; boxes are normalised to the padded frame),
    and the boxes stay in pixels of ``images``.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        self.eval()  # the wrapper too: exporters restore the wrapper's mode, recursively

    def forward(self, images: Tensor):
        from tprd.layers.box_ops import box_cxcywh_to_xyxy
        from tprd.modeling.outputs import ImageBatch
        from tprd.modeling.rt_detr import RTDETR

        det = self.detector
        h, w = images.shape[-2], images.shape[-1]
        normed = (images - det.pixel_mean) / det.pixel_std
        mask = torch.zeros_like(normed[:, 0], dtype=torch.bool)
        batch = ImageBatch(tensor=normed, mask=mask, image_sizes=[(int(h), int(w))] * int(images.shape[0]))
        if isinstance(det, RTDETR):
            batch = det.pad_batch(batch)
            h, w = batch.tensor.shape[-2], batch.tensor.shape[-1]
        main = det.forward_outputs(batch).main
        stage = det.eval_stage(main) if isinstance(det, RTDETR) else -1
        scale = torch.stack([w, h, w, h]).to(normed) if isinstance(w, Tensor) else normed.new_tensor([w, h, w, h])
        return main.logits[stage].sigmoid(), box_cxcywh_to_xyxy(main.boxes[stage]) * scale
