"""Dataclasses that carry a detector's outputs between the model, the criterion and the distiller.

Every detector's stage-wise forward returns :class:`DetectorOutputs`. Per-stage predictions are
stacked tensors so that matching, TPRD and losses vectorise over stages and queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import Tensor


@dataclass
class ImageBatch:
    """Normalised, padded images of one batch.

    ``tensor`` ``[B,3,H,W]``; ``mask`` ``[B,H,W]`` bool, ``True`` on padding;
    ``image_sizes`` the unpadded ``(h, w)`` of each image.
    """

    tensor: Tensor
    mask: Tensor
    image_sizes: List[tuple]


@dataclass
class StagePredictions:
    """Predictions of one query group at every decoder stage.

    ``logits`` ``[L,B,Q,C]``; ``boxes`` ``[L,B,Q,4]`` normalised cxcywh (index ``L-1`` = final
    stage); ``hidden`` ``[L,B,Q,D]`` decoder states; ``references`` ``[L,B,Q,2|4]``, the reference
    each layer received (normalised, after sigmoid).
    """

    logits: Tensor
    boxes: Tensor
    hidden: Optional[Tensor] = None
    references: Optional[Tensor] = None

    @property
    def num_stages(self) -> int:
        return self.logits.shape[0]

    def stage(self, l: int) -> Dict[str, Tensor]:
        """detrex-style dict ``{"pred_logits", "pred_boxes"}`` of stage ``l`` (0-based)."""
        return {"pred_logits": self.logits[l], "pred_boxes": self.boxes[l]}


@dataclass
class QueryGroup:
    """Extra queries decoded in the same decoder pass as the main group, behind a block-diagonal
    self-attention mask (they never see other groups).

    ``content`` ``[B,Q,D]`` (or ``[Q,D]``, broadcast); ``reference`` ``[B,Q,2|4]`` normalised
    (after sigmoid); ``position`` ``[B,Q,D]`` optional positional query (Deformable DETR's
    positional half). ``name`` keys the group's predictions in :attr:`DetectorOutputs.groups`.

    ``token_index`` ``[B,Q]``: the encoder tokens the queries were selected from (RT-DETR's queries
    tap carries it). With ``content=None`` a detector that selects its queries from encoder tokens
    (RT-DETR) decodes, as content, **its own** selected-query features at those tokens (the same
    image positions in its own feature space); other detectors need ``content``.
    """

    name: str
    content: Optional[Tensor]
    reference: Tensor
    position: Optional[Tensor] = None
    token_index: Optional[Tensor] = None

    def require_content(self, family: str) -> Tensor:
        """``content``, or an error naming the group when it is left to the decoding model."""
        if self.content is None:
            raise ValueError(f"query group {self.name!r} has no content vectors (token_index only): {family} cannot "
                             "take its own features at given tokens; only RT-DETR can (own query content)")
        return self.content


@dataclass
class DetectorOutputs:
    """Everything a detector's training forward produces.

    ``main``: predictions of the matching (main) query group. ``groups``: predictions of the extra
    query groups, by name. ``enc``: two-stage / DINO encoder proposals (``{"pred_logits",
    "pred_boxes"}``, plus anything else the criterion needs). ``dn``: DINO denoising predictions
    and their meta data, kept apart from the main group. ``taps``: intermediate tensors methods may
    ask for (``backbone``, ``neck`` (list of ``[B,D,H,W]``), ``neck_masks``, ``memory`` ``[B,S,D]``,
    ``spatial_shapes``, ``level_start_index``, ``valid_ratios``, ``memory_mask``, ``queries``
    (the model's initial queries/references), attention maps when requested).
    """

    main: StagePredictions
    groups: Dict[str, StagePredictions] = field(default_factory=dict)
    enc: Optional[Dict[str, Any]] = None
    dn: Optional[Dict[str, Any]] = None
    taps: Dict[str, Any] = field(default_factory=dict)
