"""Conditional attention of Conditional DETR / DAB-DETR (batch-first, with residual connection).

Both modules keep detrex's parameter names (``query_content_proj``, ``query_pos_proj``, ...), so
their state-dict entries match a detrex checkpoint one to one.

* :class:`ConditionalSelfAttention` projects content and position of the queries separately and
  attends with ``q = Wc_q x + Wp_q p`` and ``k = Wc_k x + Wp_k p`` (head size ``D / heads``).
* :class:`ConditionalCrossAttention` attends from the queries to the encoder memory. Per head, the
  query is the concatenation ``[content_h ; sine_h]`` of the content projection and the projected
  sine embedding of the query's anchor, and the key is ``[content_h ; pos_h]`` of the memory
  content and its projected position embedding, so every head works in ``2 D / heads``
  dimensions and the scale is ``(2 D / heads) ** -0.5``. Only the first decoder layer also adds
  the positional query to the content query (and the key position to the key content): the other
  layers have no ``query_pos_proj``.

Both return ``query + out_proj(attention)``, i.e. the residual is included, as in detrex.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ConditionalSelfAttention", "ConditionalCrossAttention"]


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, C]`` -> ``[B, heads, N, C / heads]``."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).permute(0, 2, 1, 3)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    dropout: nn.Module,
) -> Tuple[Tensor, Tensor]:
    """Scaled dot-product attention on ``[B, heads, N, d]`` tensors.

    ``attn_mask``: ``[N, M]`` (or ``[B, heads, N, M]``) bool, ``True`` = blocked, or additive float.
    ``key_padding_mask``: ``[B, M]`` bool, ``True`` = padding. Returns the output ``[B, N, heads*dv]``
    and the softmax weights ``[B, heads, N, M]`` (before dropout).
    """
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn = attn.masked_fill(attn_mask, float("-inf"))
        else:
            attn = attn + attn_mask
    if key_padding_mask is not None:
        attn = attn.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = attn.softmax(dim=-1)
    out = dropout(weights) @ v
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d), weights


class _ConditionalAttention(nn.Module):
    """The projections both conditional attentions have, in detrex's order (so parameters are
    created, and initialised, in the same order): query content, query position (``use_query_pos``),
    query sine embedding (``sine_query``), key content, key position, value and output, with the
    scale ``(head_factor * D / heads) ** -0.5``."""

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float, proj_drop: float, use_query_pos: bool,
                 sine_query: bool, head_factor: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.query_content_proj = nn.Linear(embed_dim, embed_dim)
        self.query_pos_proj = nn.Linear(embed_dim, embed_dim) if use_query_pos else None
        if sine_query:
            self.query_pos_sine_proj = nn.Linear(embed_dim, embed_dim)
        self.key_content_proj = nn.Linear(embed_dim, embed_dim)
        self.key_pos_proj = nn.Linear(embed_dim, embed_dim)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.scale = (head_factor * embed_dim // num_heads) ** -0.5

    def _output(self, query: Tensor, out: Tensor, weights: Tensor, need_weights: bool):
        """``query + proj_drop(out_proj(out))`` (the residual included), with the weights if asked."""
        out = query + self.proj_drop(self.out_proj(out))
        return (out, weights) if need_weights else out


class ConditionalSelfAttention(_ConditionalAttention):
    """Self-attention between decoder queries with separate content/position projections.

    ``forward(query [B,N,D], query_pos [B,N,D], attn_mask=None, key_padding_mask=None)`` ->
    ``query + out`` ``[B,N,D]``. With ``need_weights=True`` also the per-head softmax weights
    ``[B, heads, N, N]``.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(embed_dim, num_heads, attn_drop, proj_drop, use_query_pos=True, sine_query=False,
                         head_factor=1)

    def forward(self, query: Tensor, query_pos: Tensor, attn_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False):
        q = self.query_content_proj(query) + self.query_pos_proj(query_pos)
        k = self.key_content_proj(query) + self.key_pos_proj(query_pos)
        v = self.value_proj(query)
        h = self.num_heads
        out, weights = _attend(
            _split_heads(q, h), _split_heads(k, h), _split_heads(v, h),
            self.scale, attn_mask, key_padding_mask, self.attn_drop,
        )
        return self._output(query, out, weights, need_weights)


class ConditionalCrossAttention(_ConditionalAttention):
    """Cross-attention from the decoder queries to the encoder memory (conditional spatial query).

    ``use_query_pos``: whether this layer adds the positional query to the content query (only the
    first DAB-DETR decoder layer does; without it the module has no ``query_pos_proj``).

    ``forward(query [B,N,D], memory [B,M,D], memory_pos [B,M,D], query_pos [B,N,D],
    query_sine_embed [B,N,D], attn_mask=None, key_padding_mask=None)`` -> ``query + out``.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 use_query_pos: bool = True):
        super().__init__(embed_dim, num_heads, attn_drop, proj_drop, use_query_pos=use_query_pos, sine_query=True,
                         head_factor=2)

    def forward(self, query: Tensor, memory: Tensor, memory_pos: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False):
        h = self.num_heads
        q = self.query_content_proj(query)
        k = self.key_content_proj(memory)
        v = self.value_proj(memory)
        k_pos = self.key_pos_proj(memory_pos)
        if self.query_pos_proj is not None:
            q = q + self.query_pos_proj(query_pos)
            k = k + k_pos
        sine = self.query_pos_sine_proj(query_sine_embed)
        # per head: [content ; position] -> head size 2 * D / heads
        q = torch.cat([_split_heads(q, h), _split_heads(sine, h)], dim=-1)
        k = torch.cat([_split_heads(k, h), _split_heads(k_pos, h)], dim=-1)
        out, weights = _attend(q, k, _split_heads(v, h), self.scale, attn_mask, key_padding_mask, self.attn_drop)
        return self._output(query, out, weights, need_weights)
