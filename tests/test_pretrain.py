"""Backbone pretraining on the synthetic paper-style data (tprd.engine.pretrain) and the paper style itself."""
import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def paper_datasets(tmp_path_factory):
    from tprd.data.catalog import register_coco_instances
    from tprd.data.synthetic import PAPER_CLASSES, generate_synthetic_dataset

    root = tmp_path_factory.mktemp("paper")
    summary = generate_synthetic_dataset(root, num_train=12, num_val=6, seed=4, image_size=(64, 80), max_objects=6,
                                         style="paper")
    assert summary["classes"] == list(PAPER_CLASSES) and len(PAPER_CLASSES) == 24
    for split in ("train", "val"):
        register_coco_instances(f"pt_paper_{split}", summary["coco"][split]["json_file"],
                                summary["coco"][split]["image_root"])
    return root, summary


def test_paper_style_images_and_classes(paper_datasets):
    from tprd.data.synthetic import PAPER_COLOURS, render_paper_sample

    root, summary = paper_datasets
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]][:2] == ["red_circle", "red_square"]
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])[1:]
    assert per_image.min() >= 2 and per_image.max() <= 6  # 2..max_objects objects per image
    # a "red" object really is red: its pixels' hue lies near 0 degrees, a "blue" one's near 225
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(20):
        image, boxes, labels = render_paper_sample(rng, (96, 120), max_objects=4)
        for box, label in zip(boxes.astype(int), labels):
            family = list(PAPER_COLOURS)[label // 6]
            x0, y0, x1, y1 = box
            patch = image[y0:y1, x0:x1].reshape(-1, 3).astype(float)
            hue = _dominant_hue(patch)
            if hue is None:
                continue
            diff = min(abs(hue - PAPER_COLOURS[family]), 360 - abs(hue - PAPER_COLOURS[family]))
            assert diff < 40, (family, hue)
            checked += 1
    assert checked > 20


def _dominant_hue(pixels):
    """Median hue (degrees) of the saturated pixels, or None when there are few."""
    mx, mn = pixels.max(1), pixels.min(1)
    sat = (mx - mn) / np.maximum(mx, 1)
    keep = sat > 0.45
    if keep.sum() < 10:
        return None
    r, g, b = pixels[keep].T
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return float(np.median(hue))


def test_pretrain_writes_a_backbone_file_that_loads_and_is_cached(paper_datasets, tmp_path, monkeypatch):
    from tprd.engine import pretrain
    from tprd.modeling.backbone import ResNet

    settings = pretrain.PretrainSettings(dataset="pt_paper_train", depth=18, iters=3, batch=4, crop=(48, 64))
    path = pretrain.pretrained_backbone(settings, "pt_paper_val", cache_dir=tmp_path)
    assert path.name == settings.file_name() and path.is_file()
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["settings"]["iters"] == 3 and 0.0 <= info["val"]["mAP"] <= 100.0
    state = torch.load(path, map_location="cpu")
    assert not any(k.startswith("fc.") for k in state)
    # torchvision names: loads strictly into the detectors' ResNet backbone
    backbone = ResNet(depth=18, norm="BN")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    # trained: differs from a fresh network's weights
    assert not torch.equal(state["layer1.0.conv1.weight"], ResNet(depth=18).state_dict()["layer1.0.conv1.weight"])
    # cached: a second call trains nothing
    monkeypatch.setattr(pretrain, "pretrain_backbone_file", lambda *a, **k: pytest.fail("retrained"))
    assert pretrain.pretrained_backbone(settings, "pt_paper_val", cache_dir=tmp_path) == path


def test_random_crops_label_what_lies_inside():
    from tprd.engine.pretrain import _random_crops

    images = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    # class 0 in the top-left corner, class 1 in the bottom-right corner (10x10 boxes)
    objects = [(torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]]), torch.tensor([0, 1]))]
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(400):  # each corner lies half inside for ~8% of the crops
        crops, labels = _random_crops(images, objects, torch.tensor([0]), (20, 20), 2, g)
        assert crops.shape == (1, 3, 20, 20)
        seen.add(tuple(labels[0].tolist()))
    # a 20x20 crop can hold at most one of the two corners' boxes by half
    assert (1.0, 1.0) not in seen and (1.0, 0.0) in seen and (0.0, 1.0) in seen
