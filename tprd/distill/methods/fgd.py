"""FGD, focal and global distillation (docs/methods.md#fgd; method name ``fgd``, stage-free term ``fgd``).

Per neck level (student map ``F_s``, teacher map ``F_t``, ``[B,D,H,W]``, temperature ``T``):

* attention: spatial ``S = H·W·softmax_HW(mean_D |F| / T)`` ``[B,H,W]`` and channel
  ``Cc = D·softmax_D(mean_HW |F| / T)`` ``[B,D]``, for both models;
* masks from the GT boxes (:func:`fgd_masks`): foreground ``M_fg`` = ``1/area`` of the boxes covering
  a cell (maximum over overlapping boxes), background ``M_bg`` = the uncovered cells, normalised to
  sum 1 per image;
* ``fg = Σ M_fg·S_t·Cc_t·(F_s − F_t)² / B`` and ``bg`` alike with ``M_bg`` (the teacher's attention
  weighs both);
* ``mask = Σ|Cc_s − Cc_t| / B + Σ|S_s − S_t| / B`` (attention imitation);
* ``rela = Σ (GC_s(F_s) − GC_t(F_t))² / B``, global relation through GcBlock-style context modules,
  one trainable module for each side: ``GC(F) = F + channel_add(Σ_HW softmax_HW(conv_mask(F))·F)``
  with ``channel_add`` = 1x1 D -> D/2, LayerNorm([D/2,1,1]), ReLU, 1x1 D/2 -> D;
* level loss ``α·fg + β·bg + γ·mask + λ·rela`` (0.001, 0.0005, 0.001, 0.000005).

The term is the mean of the level losses (weight 0.05). ``conv_mask`` is Kaiming-normal (fan_in),
bias 0; the last conv of each ``channel_add`` is zero (weight and bias), so ``GC`` starts as the
identity. No prediction distillation: the teacher runs only to its neck (docs/methods.md#diff-14).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tprd.layers.box_ops import box_cxcywh_to_xyxy

from .base import DistillContext, DistillMethod
from .neck import check_same_necks, neck_pairs

__all__ = ["FGD", "fgd_masks", "fgd_attention", "ContextBlock"]


@torch.no_grad()
def fgd_masks(
    boxes: Sequence[Tensor],
    image_sizes,
    padded_size: Tuple[int, int],
    feature_size: Tuple[int, int],
) -> Tuple[Tensor, Tensor]:
    """Foreground and background masks of one feature level (docs/methods.md#fgd) -- contract.

    Args:
        boxes: per image ``[G,4]`` normalised cxcywh (by the **unpadded** image size).
        image_sizes: ``[B,2]`` (tensor or sequence) unpadded ``(h, w)`` of each image.
        padded_size: ``(H, W)`` of the padded batch.
        feature_size: ``(h_l, w_l)`` of the level.

    A box becomes pixels of its image, then feature cells by ``w_l / W`` and ``h_l / H``; ``x_min``,
    ``y_min`` are floored, ``x_max``, ``y_max`` ceiled, all clamped to ``[0, w_l − 1]`` /
    ``[0, h_l − 1]``; each cell of the inclusive box gets ``1 / ((y_max − y_min + 1)(x_max − x_min + 1))``
    and overlapping boxes keep the maximum. Vectorised over images and boxes (padded to ``G_max``).

    Returns:
        ``fg [B,h_l,w_l]`` and ``bg [B,h_l,w_l]``: ``bg`` is 1 where ``fg`` is 0, divided by its sum
        per image when that is non-zero (all zeros when the boxes cover the whole map).
    """
    batch = len(boxes)
    h_l, w_l = int(feature_size[0]), int(feature_size[1])
    pad_h, pad_w = float(padded_size[0]), float(padded_size[1])
    device = boxes[0].device if batch else torch.device("cpu")
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(batch, 2)
    counts = torch.tensor([int(b.shape[0]) for b in boxes], device=device)
    gmax = max(int(counts.max()) if batch else 0, 1)
    valid = torch.arange(gmax, device=device)[None] < counts[:, None]  # [B,G]
    xyxy = torch.zeros(batch, gmax, 4, dtype=torch.float32, device=device)
    if bool(valid.any()):
        xyxy[valid] = box_cxcywh_to_xyxy(torch.cat([b.reshape(-1, 4) for b in boxes]).float().to(device))
    # normalised -> pixels of the unpadded image -> cells of the level
    scale_x = sizes[:, 1, None] * w_l / pad_w  # [B,1]
    scale_y = sizes[:, 0, None] * h_l / pad_h
    x0 = (xyxy[..., 0] * scale_x).floor().clamp(0, w_l - 1)
    y0 = (xyxy[..., 1] * scale_y).floor().clamp(0, h_l - 1)
    x1 = (xyxy[..., 2] * scale_x).ceil().clamp(0, w_l - 1)
    y1 = (xyxy[..., 3] * scale_y).ceil().clamp(0, h_l - 1)
    value = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1))  # [B,G]
    ys = torch.arange(h_l, device=device, dtype=torch.float32)
    xs = torch.arange(w_l, device=device, dtype=torch.float32)
    in_y = (ys[None, None] >= y0[..., None]) & (ys[None, None] <= y1[..., None])  # [B,G,h]
    in_x = (xs[None, None] >= x0[..., None]) & (xs[None, None] <= x1[..., None])  # [B,G,w]
    inside = in_y[..., :, None] & in_x[..., None, :] & valid[..., None, None]  # [B,G,h,w]
    fg = torch.where(inside, value[..., None, None], torch.zeros((), device=device)).amax(1)  # [B,h,w]
    bg = (fg == 0).float()
    total = bg.sum((1, 2), keepdim=True)
    bg = torch.where(total > 0, bg / total.clamp(min=1.0), bg)
    return fg, bg


def fgd_attention(feature: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """Spatial ``[B,H,W]`` and channel ``[B,D]`` attention of ``feature [B,D,H,W]`` (both sum to
    ``H·W`` and ``D`` per image)."""
    b, d, h, w = feature.shape
    value = feature.abs()
    spatial = h * w * F.softmax((value.mean(1) / temperature).reshape(b, -1), dim=1).reshape(b, h, w)
    channel = d * F.softmax(value.mean((2, 3)) / temperature, dim=1)
    return spatial, channel


class ContextBlock(nn.Module):
    """GcBlock-style global context added to a map: ``F + channel_add(Σ_HW softmax(conv_mask(F))·F)``.

    ``conv_mask`` 1x1 D -> 1 (Kaiming-normal fan_in, bias 0); ``channel_add`` = 1x1 D -> D/2,
    LayerNorm([D/2,1,1]), ReLU, 1x1 D/2 -> D with the last conv zero-initialised.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w = x.shape
        attn = F.softmax(self.conv_mask(x).reshape(b, 1, h * w), dim=-1)  # [B,1,HW]
        context = torch.bmm(x.reshape(b, d, h * w), attn.transpose(1, 2)).reshape(b, d, 1, 1)
        return x + self.channel_add(context)


class FGDLevel(nn.Module):
    """The two trainable context blocks of one level (student side, teacher side)."""

    def __init__(self, channels: int):
        super().__init__()
        self.student_context = ContextBlock(channels)
        self.teacher_context = ContextBlock(channels)


class FGD(DistillMethod):
    """FGD on every neck level.

    Args:
        weights: ``{"fgd": w}`` (default 0.05).
        alpha, beta, gamma, lambda_: inner weights of the foreground, background, attention and
            relation losses (0.001, 0.0005, 0.001, 0.000005).
        temperature: ``T`` of the attentions (0.5).
        num_levels, channels: the neck's levels and width (default: from the models at construction).
    """

    name = "fgd"
    terms = ("fgd",)
    needs = ("neck",)
    # the reference's FGD loss modules: conv_mask_{s,t} and channel_add_conv_{s,t} per level
    reference_key_rules = (
        (r"^feature_loss\.(\d+)\.conv_mask_s\.", r"levels.\1.student_context.conv_mask."),
        (r"^feature_loss\.(\d+)\.conv_mask_t\.", r"levels.\1.teacher_context.conv_mask."),
        (r"^feature_loss\.(\d+)\.channel_add_conv_s\.", r"levels.\1.student_context.channel_add."),
        (r"^feature_loss\.(\d+)\.channel_add_conv_t\.", r"levels.\1.teacher_context.channel_add."),
    )

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        alpha: float = 0.001,
        beta: float = 0.0005,
        gamma: float = 0.001,
        lambda_: float = 0.000005,
        temperature: float = 0.5,
        num_levels: Optional[int] = None,
        channels: Optional[int] = None,
        name: Optional[str] = None,
    ):
        super().__init__(weights if weights is not None else {"fgd": 0.05}, name)
        self.alpha, self.beta, self.gamma, self.lambda_ = float(alpha), float(beta), float(gamma), float(lambda_)
        self.temperature = float(temperature)
        self.levels = nn.ModuleList()
        if num_levels is not None and channels is not None:
            self.levels = nn.ModuleList(FGDLevel(int(channels)) for _ in range(int(num_levels)))

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        levels, channels = check_same_necks(student, teacher, "FGD")
        if len(self.levels) == 0:
            self.levels = nn.ModuleList(FGDLevel(channels) for _ in range(levels))
        elif len(self.levels) != levels:
            raise ValueError(f"FGD was built for {len(self.levels)} neck levels but the models have {levels}")

    def level_loss(self, level: FGDLevel, fs: Tensor, ft: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
        """``α·fg + β·bg + γ·mask + λ·rela`` of one level (``fg``/``bg`` masks ``[B,H,W]``)."""
        batch = fs.shape[0]
        s_sp, s_ch = fgd_attention(fs, self.temperature)
        t_sp, t_ch = fgd_attention(ft, self.temperature)
        weight = t_sp[:, None] * t_ch[:, :, None, None]  # [B,D,H,W], teacher attention on both parts
        sq = weight * (fs - ft).pow(2)
        loss_fg = (sq * fg[:, None]).sum() / batch
        loss_bg = (sq * bg[:, None]).sum() / batch
        loss_mask = (s_ch - t_ch).abs().sum() / batch + (s_sp - t_sp).abs().sum() / batch
        loss_rela = (level.student_context(fs) - level.teacher_context(ft)).pow(2).sum() / batch
        return self.alpha * loss_fg + self.beta * loss_bg + self.gamma * loss_mask + self.lambda_ * loss_rela

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        pairs = neck_pairs(ctx, "FGD")
        padded = tuple(ctx.images.tensor.shape[-2:])
        per_level: List[Tensor] = []
        for level, (fs, ft) in zip(self.levels, pairs):
            fg, bg = fgd_masks(ctx.gt_boxes, ctx.images.image_sizes, padded, tuple(fs.shape[-2:]))
            per_level.append(self.level_loss(level, fs, ft, fg.to(fs.dtype), bg.to(fs.dtype)))
        return {"fgd": torch.stack(per_level).mean()}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
                f"lambda_={self.lambda_}, temperature={self.temperature}, weights={self.weights}")
