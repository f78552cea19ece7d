"""Sine position embedding of DETR, with detrex's normalise/offset/temperature options."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-d sine/cosine embedding of the valid (unpadded) pixel grid.

    Each axis gets ``num_pos_feats`` channels; the output is ``[B, 2*num_pos_feats, H, W]`` with
    the y-channels first. Positions are the running count of valid cells along each axis; with
    ``normalize`` they become ``(pos + offset) / (last + eps) * scale``.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """``mask``: ``[B,H,W]``, ``True`` on padding. Returns ``[B, 2*num_pos_feats, H, W]``."""
        valid = (~mask.bool()).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (idx // 2) / self.num_pos_feats)
        pos_x = self._interleave(x[..., None] / dim_t)
        pos_y = self._interleave(y[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    @staticmethod
    def _interleave(t: Tensor) -> Tensor:
        # sin on even channels, cos on odd channels, interleaved pairwise.
        b, h, w, _ = t.shape
        return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=4).reshape(b, h, w, -1)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, offset={self.offset}"
        )


def get_sine_pos_embed(
    pos: Tensor, num_pos_feats: int = 128, temperature: float = 10000, exchange_xy: bool = True
) -> Tensor:
    """Sine embedding of normalised coordinates ``pos [..., n]`` -> ``[..., n*num_pos_feats]``.

    Each coordinate is scaled by 2π and embedded like :class:`PositionEmbeddingSine`; with
    ``exchange_xy`` the first two coordinates swap places in the output (y before x), as the
    DAB-DETR/DINO query embeddings expect.
    """
    scale = 2 * math.pi
    idx = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / num_pos_feats)

    def embed(x: Tensor) -> Tensor:
        x = x * scale / dim_t
        return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [embed(x) for x in pos.split(1, dim=-1)]
    if exchange_xy:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)
