"""Drawing boxes on images for the demo and the visualisation tools (torchvision + Pillow).

:func:`draw_boxes` draws ``[N,4]`` xyxy pixel boxes with one colour per class and a label
``"<class name> <score>"`` per box; :func:`side_by_side` puts two drawings next to each other
(predictions | ground truth); :func:`save_image` writes a uint8 ``[3,H,W]`` tensor with Pillow.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["class_color", "draw_boxes", "side_by_side", "save_image"]

# well-separated colours, cycled by class index
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def class_color(label: int):
    return _PALETTE[int(label) % len(_PALETTE)]


def draw_boxes(image: Tensor, boxes: Tensor, labels: Tensor, scores: Optional[Tensor] = None,
               class_names: Sequence[str] = (), width: int = 2) -> Tensor:
    """``image`` uint8 ``[3,H,W]`` with the ``[N,4]`` xyxy ``boxes`` drawn, coloured by ``labels``
    ``[N]``, labelled with the class name (``class_names[label]``, else the index) and the score."""
    from torchvision.utils import draw_bounding_boxes

    image = image.to(torch.uint8).cpu()
    if boxes.numel() == 0:
        return image.clone()
    boxes = boxes.detach().float().cpu().reshape(-1, 4)
    labels = labels.detach().cpu().reshape(-1).tolist()
    texts = []
    for i, label in enumerate(labels):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        texts.append(f"{name} {float(scores[i]):.2f}" if scores is not None else name)
    return draw_bounding_boxes(image, boxes, labels=texts, colors=[class_color(l) for l in labels], width=width)


def side_by_side(left: Tensor, right: Tensor, gap: int = 4) -> Tensor:
    """Two ``[3,H,W]`` uint8 images next to each other, white gap, padded to the taller one."""
    h = max(left.shape[1], right.shape[1])
    canvas = torch.full((3, h, left.shape[2] + gap + right.shape[2]), 255, dtype=torch.uint8)
    canvas[:, : left.shape[1], : left.shape[2]] = left
    canvas[:, : right.shape[1], left.shape[2] + gap:] = right
    return canvas


def save_image(image: Tensor, path: str) -> None:
    """Write a uint8 ``[3,H,W]`` RGB tensor (format from the extension, e.g. ``.jpg``, ``.png``)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
