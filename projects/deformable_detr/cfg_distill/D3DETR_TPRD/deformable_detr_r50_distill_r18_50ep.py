"""D³ETR + TPRD, Deformable DETR R50 -> R18, COCO.

The baseline ``../D3DETR/deformable_detr_r50_distill_r18_50ep.py`` with refine=True and the class weights of both
groups 1.0 -> 3.0 (docs/methods.md#tprd-variants).

Per stage the teacher's predictions are refined with TPRD (one B1 matching per stage), the
adaptive matcher runs against the refined targets, both groups' class terms become TPRD-CKD
(positives mapped through the matching / the identity) and the boxes go towards the refined
boxes; the self-/cross-attention terms stay on the raw teacher maps. Per-stage refinement
shares are logged as ``tprd_d3detr_*``.
"""
from ..D3DETR.deformable_detr_r50_distill_r18_50ep import *  # noqa: F401,F403

model.methods.d3detr.refine = True
model.methods.d3detr.weights["class"] = 3.0
model.methods.d3detr.weights["fixed_class"] = 3.0
