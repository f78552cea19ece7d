"""RT-DETRv2's data pipeline (tprd/data/rtdetr_transforms.py, docs/rt_detr.md#data-pipeline): boxes
stay on their pixels, degenerate boxes leave with their labels, the output is what RTDETR consumes,
the stop iteration switches the early ops and the multi-scale sizes off (also after a resume and in
loader workers), every process draws the same batch size, and a tiny RT-DETR trains on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from tprd.data import (
    BatchMultiScaleResize,
    RTDETRDatasetMapper,
    build_detection_train_loader,
    rtdetr_test_augmentation,
    rtdetr_train_augmentation,
    skip_train_batches,
)

REPO = Path(__file__).resolve().parents[1]

# pure colours on black (RandomZoomOut fills with 0, so the canvas stays black too)
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
BOXES = [[8, 6, 40, 30], [60, 40, 110, 90], [84, 8, 120, 28]]  # x0, y0, x1, y1 on a 96 x 128 image


def _record(tmp_path: Path, boxes=BOXES, classes=(0, 1, 2), image_id=0) -> dict:
    img = np.zeros((96, 128, 3), np.uint8)
    for (x0, y0, x1, y1), c in zip(BOXES, COLOURS):
        img[y0:y1, x0:x1] = c
    path = tmp_path / f"img{image_id}.png"
    if not path.exists():
        Image.fromarray(img).save(path)
    return {"file_name": str(path), "height": 96, "width": 128, "image_id": image_id,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "classes": np.asarray(classes, np.int64)}


def _colour_mask(image: torch.Tensor, cls: int) -> np.ndarray:
    """Pixels clearly of colour ``cls``: its channel high, the others low."""
    im = image.permute(1, 2, 0).numpy().astype(int)
    ch = int(np.argmax(COLOURS[cls]))
    others = [c for c in range(3) if c != ch]
    return (im[..., ch] > 160) & (im[..., others] < 60).all(-1)


def test_boxes_stay_on_their_pixels_through_zoom_out_iou_crop_flip_and_resize(tmp_path):
    early, aug = rtdetr_train_augmentation(size=(72, 80))
    assert isinstance(early[0], v2.RandomPhotometricDistort)  # colours change there: left out of this check
    mapper = RTDETRDatasetMapper(aug, early[1:])
    rec = _record(tmp_path)
    kept = changed = 0
    for seed in range(16):
        torch.manual_seed(seed)
        out = mapper(rec)
        assert out["image"].shape == (3, 72, 80)
        assert len(out["gt_boxes"]) == len(out["gt_classes"])
        for box, cls in zip(out["gt_boxes"].tolist(), out["gt_classes"].tolist()):
            x0, y0, x1, y1 = box
            mask = _colour_mask(out["image"], cls)
            ys, xs = np.nonzero(mask)
            # every box keeps some of its colour, and the colour's inside of the box sits in the box
            inner = mask[int(np.ceil(y0 + 1)):int(y1 - 1), int(np.ceil(x0 + 1)):int(x1 - 1)]
            if inner.size:
                assert inner.mean() > 0.9, (seed, cls, box)
            assert len(xs) > 0, (seed, cls, box)
            in_box = (xs >= x0 - 1.5) & (xs < x1 + 1.5) & (ys >= y0 - 1.5) & (ys < y1 + 1.5)
            # pixels of the colour outside the box can only belong to an object whose box the IoU
            # crop dropped (its centre left the crop); a kept box covers all of its object otherwise
            assert in_box.mean() > 0.5, (seed, cls, box)
            kept += 1
        scaled = [[b[0] * 80 / 128, b[1] * 72 / 96, b[2] * 80 / 128, b[3] * 72 / 96] for b in BOXES]
        flipped = [[80 - b[2], b[1], 80 - b[0], b[3]] for b in scaled]
        boxes = out["gt_boxes"].tolist()
        if len(boxes) != len(BOXES) or not (np.allclose(boxes, scaled, atol=1e-3) or np.allclose(boxes, flipped, atol=1e-3)):
            changed += 1
    assert kept > 16 and changed > 4  # the zoom-out / IoU crop did move boxes


def test_sanitize_drops_degenerate_boxes_with_their_labels(tmp_path):
    # a box 1.5 px wide becomes 0.75 px at half size: SanitizeBoundingBoxes(min_size=1) drops it
    boxes = [[8, 6, 40, 30], [50, 10, 51.5, 50], [60, 40, 110, 90]]
    rec = _record(tmp_path, boxes=boxes, classes=(2, 5, 7))
    _, aug = rtdetr_train_augmentation(size=(48, 64))
    mapper = RTDETRDatasetMapper(aug)
    for seed in range(4):  # flipped or not
        torch.manual_seed(seed)
        out = mapper(rec)
        assert out["gt_classes"].tolist() == [2, 7]
        wh = (out["gt_boxes"][:, 2:] - out["gt_boxes"][:, :2]).tolist()
        assert np.allclose(wh, [[16, 12], [25, 25]])


def test_output_is_the_mappers_contract_and_test_resize_keeps_the_original_size(tmp_path):
    rec = _record(tmp_path)
    early, aug = rtdetr_train_augmentation()  # the official 640x640
    train = RTDETRDatasetMapper(aug, early)
    for seed in range(3):
        torch.manual_seed(seed)
        out = train(rec)
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 640, 640)
        assert type(out["image"]) is torch.Tensor and type(out["gt_boxes"]) is torch.Tensor
        b = out["gt_boxes"]
        assert b.dtype == torch.float32 and b.shape[1] == 4 and len(b) > 0
        assert (b[:, 2:] - b[:, :2] >= 1).all() and (b >= 0).all() and (b <= 640).all()  # xyxy pixels
        assert out["gt_classes"].dtype == torch.int64
        assert (out["height"], out["width"], out["image_id"]) == (96, 128, 0)
    test = RTDETRDatasetMapper(rtdetr_test_augmentation(), is_train=False)
    out = test(rec)
    assert out["image"].shape == (3, 640, 640) and (out["height"], out["width"]) == (96, 128)
    torch.testing.assert_close(out["gt_boxes"][0], torch.tensor([8 * 5.0, 6 * 20 / 3, 40 * 5.0, 30 * 20 / 3]))


def test_stop_iter_turns_the_early_ops_off(tmp_path):
    rec = _record(tmp_path)
    early, aug = rtdetr_train_augmentation(size=(64, 64))
    mapper = RTDETRDatasetMapper(aug, early, stop_iter=10)
    late_only = RTDETRDatasetMapper(aug)

    def run(m, seed, **kw):
        torch.manual_seed(seed)
        out = m(rec, **kw)
        return out["image"], out["gt_boxes"]

    differs = 0
    for seed in range(6):
        img, boxes = run(mapper, seed, iteration=10)
        ref_img, ref_boxes = run(late_only, seed)
        assert torch.equal(img, ref_img) and torch.equal(boxes, ref_boxes)
        assert torch.equal(run(mapper, seed, iteration=10_000)[0], ref_img)
        before = run(mapper, seed, iteration=9)
        differs += not (torch.equal(before[0], ref_img) and torch.equal(before[1], ref_boxes))
    assert differs >= 4  # before the stop the photometric / zoom-out / crop ops run
    assert mapper.early_ops_on(None) and mapper.early_ops_on(9) and not mapper.early_ops_on(10)
    assert not RTDETRDatasetMapper(aug, early, stop_iter=0).early_ops_on(0)
    assert not RTDETRDatasetMapper(aug, early, is_train=False).early_ops_on(0)
    with pytest.raises(ValueError, match="stop_iter"):
        RTDETRDatasetMapper(aug, early, stop_iter=-1)


def test_loader_passes_the_iteration_across_resume_and_workers(tmp_path):
    """An early op that inverts the image marks the samples mapped before ``stop_iter``."""
    recs = [_record(tmp_path, image_id=i) for i in range(3)]
    _, aug = rtdetr_train_augmentation(size=(32, 32))
    marker = RTDETRDatasetMapper(aug, [v2.RandomInvert(p=1.0)], stop_iter=3)

    def stream(mapper, skip=0, n=5, workers=0, **kw):
        loader = build_detection_train_loader(recs, mapper, 2, num_workers=workers, seed=4, rank=0, world_size=1,
                                              aspect_ratio_grouping=False, **kw)
        assert skip_train_batches(loader, skip)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    # the black background becomes white while the inversion is on
    inverted = [[bool(s["image"][:, -1, -1].min() > 200) for s in batch] for batch in stream(marker)]
    assert inverted == [[True, True]] * 3 + [[False, False]] * 2
    resumed = [[bool(s["image"][:, -1, -1].min() > 200) for s in batch] for batch in stream(marker, skip=2, n=3)]
    assert resumed == inverted[2:]

    # the real pipeline: a resumed run and a run with workers map every sample as the plain run does
    early, aug = rtdetr_train_augmentation(size=(32, 32))
    full = RTDETRDatasetMapper(aug, early, stop_iter=3)
    multiscale = BatchMultiScaleResize((32, 48, 64), stop_iter=4)

    def key(batches):
        return [[(s["image_id"], s["gt_boxes"].tolist(), s["image"].sum().item(), tuple(s["image"].shape))
                 for s in b] for b in batches]

    plain = key(stream(full, batch_transform=multiscale))
    assert key(stream(full, skip=2, n=3, batch_transform=multiscale)) == plain[2:]
    assert key(stream(full, workers=2, batch_transform=multiscale)) == plain


def test_multiscale_same_size_on_every_rank_and_off_from_stop_iter(tmp_path):
    recs = [_record(tmp_path, image_id=i) for i in range(4)]
    _, aug = rtdetr_train_augmentation(size=(32, 32))
    mapper = RTDETRDatasetMapper(aug)
    scales = (32, 48, 64, 80, 96)

    def batches(rank, transform, skip=0, n=8):
        loader = build_detection_train_loader(recs, mapper, 4, seed=9, rank=rank, world_size=2,
                                              aspect_ratio_grouping=False, batch_transform=transform)
        skip_train_batches(loader, skip)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    def sizes(bs):
        out = []
        for b in bs:
            shapes = {tuple(s["image"].shape[-2:]) for s in b}
            assert len(shapes) == 1 and shapes.pop()[0] == b[0]["image"].shape[-1]  # one square size per batch
            out.append(int(b[0]["image"].shape[-1]))
        return out

    transform = BatchMultiScaleResize(scales, stop_iter=6)
    r0, r1 = batches(0, transform), batches(1, transform)
    s0 = sizes(r0)
    assert s0 == sizes(r1)
    assert [s["image_id"] for s in r0[0]] != [s["image_id"] for s in r1[0]]  # different images, same size
    assert len(set(s0[:6])) > 1 and set(s0[:6]) <= set(scales)
    assert s0[6:] == [32, 32]  # from stop_iter on, the mapper's size
    assert sizes(batches(0, transform, skip=3, n=5)) == s0[3:]

    # boxes scale with their image; the original size stays
    plain = batches(0, None)
    for b, p in zip(r0, plain):
        for s, q in zip(b, p):
            f = s["image"].shape[-1] / 32
            torch.testing.assert_close(s["gt_boxes"], q["gt_boxes"] * f)
            assert (s["height"], s["width"]) == (96, 128) and s["image_id"] == q["image_id"]


def test_default_scales_are_the_references():
    assert BatchMultiScaleResize().scales == (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)
    with pytest.raises(ValueError, match="scales"):
        BatchMultiScaleResize(())


def test_tiny_rtdetr_trains_on_the_pipeline(tmp_path, monkeypatch):
    """The synthetic R18vd model, a few steps on synthetic shapes mapped by the RT-DETR pipeline at
    small sizes, the mapper's nodes taken from the COCO config (``common/rtdetr_training.py``)."""
    from tprd.config import LazyConfig, instantiate
    from tprd.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path / "synthetic", num_train=4, num_val=1, seed=2)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = LazyConfig.load(REPO / "projects/rt_detr/configs/rtdetrv2_r18vd_synthetic.py")
    coco = LazyConfig.load(REPO / "projects/rt_detr/configs/rtdetrv2_r50vd_6x_coco.py")
    cfg.model.device = "cpu"
    cfg.model.decoder.num_layers = 1
    data = cfg.dataloader.train
    data.mapper = coco.dataloader.train.mapper
    data.batch_transform = coco.dataloader.train.batch_transform
    LazyConfig.apply_overrides(cfg, [
        "dataloader.train.mapper.augmentation.2.size=[64,64]", "dataloader.train.mapper.stop_iter=2",
        "dataloader.train.batch_transform.scales=[64,96]", "dataloader.train.batch_transform.stop_iter=2",
        "dataloader.train.total_batch_size=2", "+dataloader.train.seed=0",
    ])
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    loader = instantiate(cfg.dataloader.train)
    assert isinstance(loader.dataset.mapper, RTDETRDatasetMapper)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(loader)
    for step in range(3):
        batch = next(it)
        size = batch[0]["image"].shape[-1]
        assert all(s["image"].shape == (3, size, size) and s["image"].dtype == torch.uint8 for s in batch)
        if step == 2:
            assert size == 64
        targets = model.prepare_targets(batch)  # normalised cxcywh of the xyxy pixel boxes
        for s, t in zip(batch, targets):
            b = s["gt_boxes"] / size
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
            torch.testing.assert_close(t["boxes"], cxcywh)
            assert ((t["boxes"] > 0) & (t["boxes"] <= 1)).all()
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
