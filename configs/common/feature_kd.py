"""The feature-imitation methods as the reference configures them (docs/methods.md#fgd, #fitnet, #mgd, #weights), the same
for the three detectors; each works on whatever levels the detector's ``neck`` tap holds (4 for
Deformable DETR and DINO, the single input projection for DAB-DETR). The teacher runs only to its
neck (docs/methods.md#diff-14).

* ``fgd``: weight 0.05; inner alpha 0.001 (foreground), beta 0.0005 (background), gamma 0.001
  (attention), lambda 0.000005 (global relation), temperature 0.5.
* ``fitnet``: weight 10 (mean-reduced MSE divided again by the batch size, docs/methods.md#diff-15).
* ``mgd``: weight 10, mask ratio 0.5, masks seeded from ``train.seed`` and the iteration.

Used as ``model.methods = {"fgd": ...}`` by ``projects/<det>/cfg_distill/{FGD,FitNet,MGD}[_TPRD]/``.
"""
from tprd.config import LazyCall as L
from tprd.distill import FGD, MGD, FitNet

fgd = L(FGD)(
    weights={"fgd": 0.05},
    alpha=0.001,
    beta=0.0005,
    gamma=0.001,
    lambda_=0.000005,
    temperature=0.5,
)

fitnet = L(FitNet)(weights={"fitnet": 10.0})

mgd = L(MGD)(weights={"mgd": 10.0}, mask_ratio=0.5, seed="${train.seed}")
