"""Classification pretraining of a ResNet backbone on a synthetic dataset, cached like ImageNet weights.

On COCO every DETR starts from an ImageNet-pretrained ResNet. The synthetic benchmark's ``paper``
regime (``tools/distill_benchmark.py --budget paper``) does the same on its own image domain: a
torchvision ResNet is trained once for multi-label classification (which of the dataset's classes
appear in an image: binary cross-entropy per class) on the training split of the detection
dataset (random crops at full resolution, as ImageNet training crops objects), and its weights are written as a torchvision state dict without ``fc.*``. That file is
what ``train.init_checkpoint`` takes for a backbone (the loader maps torchvision names onto
``model.backbone``) and what ``merge_weight.py`` takes as the student backbone.

The file is cached under ``<dataset root>/backbones/`` with the settings in its name; a second
call with the same settings returns it without training. Images are normalised exactly as the
detectors normalise them (``PIXEL_MEAN`` / ``PIXEL_STD`` of :mod:`tprd.modeling.detector`: 0..255
RGB, ImageNet statistics) and flipped at random.

    python tools/pretrain_backbone.py --dataset synthetic_paper_train --depth 18 --iters 1500
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PretrainSettings", "pretrained_backbone", "pretrain_backbone_file"]


@dataclass(frozen=True)
class PretrainSettings:
    """What decides the weights (and so the cache file's name)."""

    dataset: str = "synthetic_paper_train"
    depth: int = 18
    iters: int = 1000
    batch: int = 32
    crop: Tuple[int, int] = (80, 96)  # (H, W) of the random training crops, at full resolution
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def file_name(self) -> str:
        return (f"resnet{self.depth}_{self.dataset}_it{self.iters}_b{self.batch}_c{self.crop[0]}x{self.crop[1]}_lr{self.lr:g}"
                f"_wd{self.weight_decay:g}_s{self.seed}.pth")


def _load_images(dataset: str) -> Tuple[torch.Tensor, torch.Tensor, int, list]:
    """All images of a registered COCO-layout dataset as ``uint8 [N,3,H,W]`` (they must share one
    size, as the synthetic sets do), their multi-hot labels ``[N, C]``, the class count and the
    per-image ``(boxes [n,4] xyxy, classes [n])``."""
    from PIL import Image

    from tprd.data.catalog import DatasetCatalog, MetadataCatalog, prepare_dataset

    prepare_dataset(dataset)
    records = DatasetCatalog.get(dataset)
    num_classes = len(MetadataCatalog.get(dataset).thing_classes)
    images, labels, objects = [], torch.zeros(len(records), num_classes), []
    for i, rec in enumerate(records):
        with Image.open(rec["file_name"]) as im:
            images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        classes = torch.as_tensor(np.asarray(rec["classes"], dtype=np.int64))
        labels[i, classes] = 1.0
        objects.append((torch.as_tensor(np.asarray(rec["boxes"], dtype=np.float32)).reshape(-1, 4), classes))
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"pretraining needs images of one size; dataset {dataset!r} has {sorted(sizes)[:4]}")
    return torch.stack(images), labels, num_classes, objects


def _random_crops(images: torch.Tensor, objects: list, idx: torch.Tensor, crop: Tuple[int, int], num_classes: int,
                  gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One random ``crop`` of each image ``idx`` (objects keep their scale, as ImageNet crops do),
    randomly flipped; a class is present when at least half of one of its boxes lies inside."""
    ch, cw = crop
    _, _, h, w = images.shape
    ys = torch.randint(0, h - ch + 1, (len(idx),), generator=gen)
    xs = torch.randint(0, w - cw + 1, (len(idx),), generator=gen)
    flip = torch.rand(len(idx), generator=gen) < 0.5
    out = torch.empty(len(idx), 3, ch, cw, dtype=images.dtype)
    labels = torch.zeros(len(idx), num_classes)
    for j, (i, y, x) in enumerate(zip(idx.tolist(), ys.tolist(), xs.tolist())):
        out[j] = images[i, :, y:y + ch, x:x + cw]
        boxes, classes = objects[i]
        ix0, iy0 = boxes[:, 0].clamp(min=x), boxes[:, 1].clamp(min=y)
        ix1, iy1 = boxes[:, 2].clamp(max=x + cw), boxes[:, 3].clamp(max=y + ch)
        inside = (ix1 - ix0).clamp(min=0) * (iy1 - iy0).clamp(min=0)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        labels[j, classes[inside >= 0.5 * area]] = 1.0
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out, labels


def _classifier(depth: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet

    builders = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
    if depth not in builders:
        raise ValueError(f"ResNet depth must be one of {sorted(builders)}, got {depth}")
    return builders[depth](weights=None, num_classes=num_classes)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    from tprd.modeling.detector import PIXEL_MEAN, PIXEL_STD

    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x.float() - mean) / std


@torch.no_grad()
def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Mean average precision over classes (multi-label ranking) and exact-match accuracy."""
    model.eval()
    scores = torch.cat([model(_normalise(images[i:i + 64])) for i in range(0, len(images), 64)]).sigmoid()
    model.train()
    aps = []
    for c in range(labels.shape[1]):
        y = labels[:, c]
        if y.sum() == 0:
            continue
        order = scores[:, c].argsort(descending=True)
        hits = y[order]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    exact = float(((scores > 0.5).float() == labels).all(dim=1).float().mean())
    return {"mAP": 100.0 * sum(aps) / max(len(aps), 1), "exact_match": 100.0 * exact}


def pretrain_backbone_file(settings: PretrainSettings, out: Path, val_dataset: Optional[str] = None) -> Dict[str, float]:
    """Train the classifier of ``settings`` and write its backbone (torchvision names, no ``fc``)
    to ``out`` atomically, with ``out.json`` holding the settings, the validation scores and the
    time. Returns the validation scores."""
    from tprd.progress import progress_bar

    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    images, _, num_classes, objects = _load_images(settings.dataset)
    model = _classifier(settings.depth, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.iters // 20)

    def lr_at(it: int) -> float:  # linear warm-up, then cosine to zero
        if it < warmup:
            return settings.lr * (0.1 + 0.9 * it / warmup)
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / max(1, settings.iters - warmup)))

    loss_fn = nn.BCEWithLogitsLoss()
    started, running = time.time(), None
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    with progress_bar(settings.iters, f"pretrain ResNet-{settings.depth}", unit="it") as bar:
        for it in range(settings.iters):
            if pos + settings.batch > len(order):
                order, pos = torch.randperm(len(images), generator=gen), 0
            idx = order[pos:pos + settings.batch]
            pos += settings.batch
            x, y = _random_crops(images, objects, idx, settings.crop, num_classes, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(it)
            loss = loss_fn(model(_normalise(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            if (it + 1) % 50 == 0:
                bar.set_postfix_str(f"loss {running:.4f}")
            if (it + 1) % 100 == 0 or it + 1 == settings.iters:  # the log's progress line (no bar in files)
                spent = time.time() - started
                eta = spent / (it + 1) * (settings.iters - it - 1)
                logger.info(f"pretrain ResNet-{settings.depth}: iter {it + 1}/{settings.iters}, loss {running:.4f}, "
                            f"{spent / (it + 1):.2f} s/iter, ETA {eta / 60:.1f} min")
    scores: Dict[str, float] = {}
    if val_dataset:
        val_images, val_labels, _, _ = _load_images(val_dataset)
        scores = _evaluate(model, val_images, val_labels)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    info = {"settings": asdict(settings), "val_dataset": val_dataset, "val": scores,
            "final_train_loss_ema": running, "seconds": time.time() - started,
            "torch_threads": torch.get_num_threads()}
    tmp_json = out.with_name(out.name + ".json.tmp")
    tmp_json.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp_json, out.with_name(out.name + ".json"))
    logger.info(f"pretrained ResNet-{settings.depth} on {settings.dataset}: validation {scores}; wrote {out}")
    return scores


def pretrained_backbone(settings: PretrainSettings, val_dataset: Optional[str] = None,
                        cache_dir: Optional[Path] = None) -> Path:
    """The cached backbone file of ``settings`` (trained on first use). Default cache: the
    ``backbones/`` folder of the dataset's root (``$DETECTRON2_DATASETS/<folder>/backbones``)."""
    if cache_dir is None:
        from tprd.data.catalog import MetadataCatalog, prepare_dataset

        prepare_dataset(settings.dataset)
        cache_dir = Path(MetadataCatalog.get(settings.dataset).image_root).parent / "backbones"
    path = Path(cache_dir) / settings.file_name()
    if not path.is_file():
        pretrain_backbone_file(settings, path, val_dataset)
    return path
