#!/usr/bin/env python
"""A picture of TPRD: what the refinement does to a teacher's per-stage predictions.

    python tools/visualize_tprd.py --run RUN_DIR --out DIR [--num-images 4] [--max-images N] [--opts key=value ...]
    python tools/visualize_tprd.py --config CONFIG.py --checkpoint TEACHER.pth --out DIR [--opts key=value ...]

``--run`` takes a training run's folder: the model is read from its ``config.yaml`` (exactly as
trained, command-line overrides included, e.g. the benchmark's teacher folder) and the weights
from its ``model_final.pth``.

``CONFIG`` is the teacher's detector config (e.g. ``projects/dino/configs/dino_r50_4scale_12ep.py``
with an official detrex checkpoint on COCO, or the benchmark's ``OUT/configs/teacher.py`` with its
overrides and ``OUT/teacher/model_final.pth``), or a distillation config (its ``model.teacher`` is
used; the checkpoint is then a merged init file or a distillation checkpoint). On the config's
``dataloader.test`` images, the teacher predicts every decoder stage, each stage is matched to the
ground truth with the B1 matcher (focal Hungarian 2 / 5 / 2, as the methods), and
:func:`tprd.distill.tprd.refine_teacher_predictions` refines them (``return_stats=True``).

Written to ``DIR``:

* ``image_<id>.png`` for the first ``--num-images`` images: left, the GT (green) and, for every
  query matched to a GT at the final stage, its box at every stage (coloured by stage) and the
  box TPRD uses for the final stage, labelled with the stage it was borrowed from; right, the
  final-stage negatives whose top score TPRD suppressed (dashed; score before -> after, source stage);
* ``tprd_stats.md``: per stage, over the first ``--max-images`` images (default all), the share of
  positives refined and of negatives suppressed, and from which stages the refined positives
  borrowed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tprd.config import instantiate  # noqa: E402
from tprd.distill.tprd import refine_teacher_predictions  # noqa: E402
from tprd.engine.checkpoint import DetectionCheckpointer  # noqa: E402
from tprd.engine.main import load_config  # noqa: E402
from tprd.layers.box_ops import box_cxcywh_to_xyxy  # noqa: E402
from tprd.modeling.matcher import HungarianMatcher  # noqa: E402


def load_teacher(config: str, checkpoint: str, overrides: List[str]):
    """The teacher detector (eval mode, CPU unless ``train.device`` says otherwise) and the config."""
    cfg = load_config(config, overrides)
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).resume_or_load(checkpoint, resume=False)
    teacher = model.teacher if hasattr(model, "teacher") and hasattr(model, "student") else model
    device = torch.device(str(cfg.train.get("device", "cpu")) if torch.cuda.is_available() else "cpu")
    return cfg, teacher.to(device).eval()


@torch.no_grad()
def refine_batch(teacher, matcher, batch) -> Dict[str, Any]:
    """Teacher stages, their B1 matches and the TPRD refinement of one batch."""
    images = teacher.preprocess(batch)
    targets = teacher.prepare_targets(batch)
    main = teacher.forward_outputs(images).main
    matches = matcher.match_stages(main.logits, main.boxes, targets)
    logits, boxes, stats = refine_teacher_predictions(
        main.logits, main.boxes, matches,
        [t["labels"] for t in targets], [t["boxes"] for t in targets], return_stats=True,
    )
    return {"raw_logits": main.logits, "raw_boxes": main.boxes, "logits": logits, "boxes": boxes,
            "stats": stats, "matches": matches, "targets": targets}


class StatsTable:
    """Per-stage refined / suppressed counts accumulated over batches."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.images = 0

    def add(self, stats: Dict[str, torch.Tensor], num_images: int) -> None:
        num_stages = stats["num_positive"].numel()
        src = stats["positive_source_stage"]  # [L,B,Q], -1 = not refined
        # borrowed[l, k]: refined positives of target stage l that took stage k
        borrowed = torch.stack([(src == k).sum((1, 2)) for k in range(num_stages)], dim=1)
        part = {k: stats[k].cpu().long() for k in ("num_positive", "num_negative", "num_positive_refined",
                                                    "num_negative_refined")}
        part["borrowed"] = borrowed.cpu()
        for k, v in part.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.images += num_images

    def markdown(self) -> str:
        s = self.sums
        num_stages = s["num_positive"].numel()
        head = "| stage | positives | refined | negatives | suppressed | refined positives borrowed from stage |"
        lines = [f"TPRD on {self.images} images (stage 1 = first decoder layer, {num_stages} = final).", "",
                 head, "|---|---|---|---|---|---|"]
        for l in range(num_stages):
            pos, neg = int(s["num_positive"][l]), int(s["num_negative"][l])
            rp, rn = int(s["num_positive_refined"][l]), int(s["num_negative_refined"][l])
            src = ", ".join(f"{k + 1}: {int(s['borrowed'][l, k])}" for k in range(l + 1) if s["borrowed"][l, k] > 0)
            lines.append(f"| {l + 1} | {pos} | {100 * rp / max(pos, 1):.1f}% | {neg} | "
                         f"{100 * rn / max(neg, 1):.1f}% | {src or '—'} |")
        return "\n".join(lines) + "\n"


def _xyxy_pixels(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return box_cxcywh_to_xyxy(boxes.float()) * boxes.new_tensor([w, h, w, h]).float()


def draw_image(path: Path, image: torch.Tensor, res: Dict[str, Any], b: int, class_names, max_negatives: int) -> None:
    """One PNG: GT + per-stage boxes of the matched queries (left), suppressed negatives (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = int(image.shape[-2]), int(image.shape[-1])
    rgb = image.permute(1, 2, 0).float()
    rgb = (rgb / 255.0 if rgb.max() > 1.5 else rgb).clamp(0, 1).numpy()
    num_stages = res["raw_logits"].shape[0]
    last = num_stages - 1
    colors = plt.cm.plasma([0.15 + 0.7 * l / max(num_stages - 1, 1) for l in range(num_stages)])
    pos_src = res["stats"]["positive_source_stage"][last, b]
    neg_src = res["stats"]["negative_source_stage"][last, b]
    raw_boxes = [_xyxy_pixels(res["raw_boxes"][l, b], h, w) for l in range(num_stages)]
    refined = _xyxy_pixels(res["boxes"][last, b], h, w)

    def rect(ax, box, **kw):
        x0, y0, x1, y1 = [float(v) for v in box]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw))

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2 * h / w + 0.6))
    for ax in axes:
        ax.imshow(rgb)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    ax = axes[0]
    gt = res["targets"][b]
    for box, label in zip(_xyxy_pixels(gt["boxes"], h, w), gt["labels"].tolist()):
        rect(ax, box, ec="lime", lw=2.5)
        ax.text(float(box[0]), float(box[1]) - 1, class_names[label] if class_names else str(label),
                color="lime", fontsize=8, va="bottom")
    q_idx, _ = res["matches"][last][b]
    for q in q_idx.tolist():
        for l in range(num_stages):
            rect(ax, raw_boxes[l][q], ec=colors[l], lw=1.0, alpha=0.9)
        k = int(pos_src[q])
        if k >= 0:
            rect(ax, refined[q], ec="cyan", lw=2.0, ls="--")
            ax.text(float(refined[q][2]), float(refined[q][3]), f"from stage {k + 1}", color="cyan", fontsize=8,
                    ha="right", va="top", bbox=dict(fc="black", alpha=0.5, pad=1, lw=0))
    handles = [plt.Line2D([], [], color="lime", lw=2.5, label="GT")]
    handles += [plt.Line2D([], [], color=colors[l], lw=1, label=f"stage {l + 1}") for l in range(num_stages)]
    handles += [plt.Line2D([], [], color="cyan", lw=2, ls="--", label="TPRD final-stage box (borrowed)")]
    ax.legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.7)
    ax.set_title(f"GT-matched queries ({len(q_idx)}): per-stage boxes; "
                 f"{int((pos_src[q_idx] >= 0).sum()) if len(q_idx) else 0} refined", fontsize=9)

    ax = axes[1]
    raw_max = res["raw_logits"][last, b].sigmoid().max(-1).values
    new_max = res["logits"][last, b].sigmoid().max(-1).values
    suppressed = (neg_src >= 0).nonzero().flatten()
    order = suppressed[raw_max[suppressed].argsort(descending=True)][:max_negatives]
    for q in order.tolist():
        rect(ax, raw_boxes[last][q], ec="orange", lw=1.2, ls="--")
        ax.text(float(raw_boxes[last][q][0]), float(raw_boxes[last][q][1]),
                f"{raw_max[q]:.3f}->{new_max[q]:.3f} (s{int(neg_src[q]) + 1})", color="orange", fontsize=7,
                va="bottom", bbox=dict(fc="black", alpha=0.5, pad=1, lw=0))
    ax.set_title(f"suppressed final-stage negatives: {len(suppressed)} "
                 f"(top {len(order)} by score: before->after, source stage)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    from tprd.engine.defaults import add_override_arguments, override_parser

    p = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None,
                   help="a training run's folder: its config.yaml is the config (the model exactly as trained, "
                   "overrides included) and its model_final.pth (else its last checkpoint) the checkpoint")
    p.add_argument("--config", default=None, help="teacher detector config, or a distillation config (or a run folder)")
    p.add_argument("--checkpoint", default=None, help="teacher checkpoint (ours or detrex), or a merged init file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=4, help="images drawn (default 4)")
    p.add_argument("--max-images", type=int, default=0, help="images in the statistics (default 0: all)")
    p.add_argument("--max-negatives", type=int, default=10, help="suppressed negatives drawn per image")
    add_override_arguments(p)
    args = p.parse_args(argv)
    if args.run is None and args.config and Path(args.config).is_dir():
        args.run = Path(args.config)
    if args.run is not None:
        config, checkpoint = run_files(args.run)
        args.config = str(config)
        args.checkpoint = args.checkpoint or str(checkpoint)
    if not args.config or not args.checkpoint:
        p.error("give --run RUN_DIR, or --config and --checkpoint")
    args.overrides = list(args.opts or [])
    return args


def run_files(run: Path):
    """``(config.yaml, checkpoint)`` of a training run's folder (model_final.pth, else the checkpoint
    named by last_checkpoint); a folder without them is a user error naming what is missing."""
    from tprd.errors import UserError

    config = run / "config.yaml"
    if not config.is_file():
        raise UserError(f"{run} is not a training run's folder: it has no config.yaml")
    checkpoint = run / "model_final.pth"
    if not checkpoint.is_file() and (run / "last_checkpoint").is_file():
        checkpoint = run / (run / "last_checkpoint").read_text().strip()
    if not checkpoint.is_file():
        raise UserError(f"{run} holds no checkpoint (model_final.pth or last_checkpoint); pass --checkpoint")
    return config, checkpoint


def main(argv=None) -> Dict[str, Any]:
    from tprd.engine.defaults import user_errors_exit

    with user_errors_exit():
        return _main(argv)


def _main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    cfg, teacher = load_teacher(args.config, args.checkpoint, args.overrides)
    device = next(teacher.parameters()).device
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    loader = instantiate(cfg.dataloader.test)
    names = None
    try:
        from tprd.data.catalog import MetadataCatalog, resolve_dataset_names

        names = MetadataCatalog.get(resolve_dataset_names(cfg.dataloader.test.dataset.names)[0]).get("thing_classes")
    except Exception:  # a custom loader: draw class indices
        names = None
    args.out.mkdir(parents=True, exist_ok=True)
    table = StatsTable()
    drawn: List[Path] = []
    for batch in loader:
        if args.max_images and table.images >= args.max_images:
            break
        for x in batch:
            x["image"] = x["image"].to(device)
        res = refine_batch(teacher, matcher, batch)
        table.add(res["stats"], len(batch))
        for b, x in enumerate(batch):
            if len(drawn) < args.num_images:
                path = args.out / f"image_{x.get('image_id', len(drawn))}.png"
                draw_image(path, x["image"].cpu(), {k: v for k, v in res.items()}, b, names, args.max_negatives)
                drawn.append(path)
    text = table.markdown()
    (args.out / "tprd_stats.md").write_text(text)
    print(text)
    print("images:", ", ".join(str(p) for p in drawn))
    return {"images": drawn, "table": args.out / "tprd_stats.md", "sums": table.sums}


if __name__ == "__main__":
    main()
