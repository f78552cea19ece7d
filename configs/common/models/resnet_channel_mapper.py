"""ResNet-50 -> ChannelMapper and sine positions: the input stage of the multi-scale detectors.

Shared by ``projects/deformable_detr/configs/models/deformable_detr_r50.py`` and
``projects/dino/configs/models/dino_r50.py`` (detrex's R50 models): ResNet-50 with FrozenBN and a
frozen stem, giving res3..res5 -> ChannelMapper (1x1 convs to 256 channels plus one stride-2 level
from res5, i.e. 4 levels, GroupNorm 32); sine positions, temperature 10000, normalised, offset -0.5.
The R18 students change ``backbone.depth`` and ``neck.in_channels``.
"""
from tprd.config import LazyCall as L
from tprd.layers.position_embedding import PositionEmbeddingSine
from tprd.modeling.backbone import ChannelMapper, ResNet

backbone = L(ResNet)(
    depth=50,
    out_features=["res3", "res4", "res5"],
    freeze_at=1,
    norm="FrozenBN",
)

position_embedding = L(PositionEmbeddingSine)(
    num_pos_feats=128,
    temperature=10000,
    normalize=True,
    offset=-0.5,
)

neck = L(ChannelMapper)(
    in_channels=[512, 1024, 2048],
    in_features=["res3", "res4", "res5"],
    out_channels=256,
    num_outs=4,
    kernel_size=1,
    num_groups=32,
)
