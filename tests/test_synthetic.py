"""Tests of the synthetic shape dataset (tprd.data.synthetic) and its CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tprd.data.synthetic as synthetic
from tprd.data.synthetic import (
    SYNTHETIC_CLASSES,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    load_synthetic_meta,
    synthetic_dataset_root,
)

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, MAX_OBJECTS = 24, 8, 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    summary = generate_synthetic_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3, max_objects=MAX_OBJECTS)
    return root, summary


def _load_json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ COCO
def test_coco_json_loads_and_is_consistent(dataset):
    from pycocotools.coco import COCO

    root, summary = dataset
    assert summary["generated"] is True
    seen_image_ids = set()
    for split, n_images in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        json_file = root / "annotations" / f"instances_{split}.json"
        assert summary["coco"][split]["json_file"] == str(json_file)
        coco = COCO(str(json_file))
        assert len(coco.getImgIds()) == n_images
        cats = coco.loadCats(coco.getCatIds())
        assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(SYNTHETIC_CLASSES)
        assert sorted(c["id"] for c in cats) == [1, 2, 3, 4, 5]
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) == summary["num_annotations"][split]
        assert len({a["id"] for a in anns}) == len(anns)
        assert len(anns) >= n_images  # every image has at least one object
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["id"] not in seen_image_ids  # ids unique across splits
            seen_image_ids.add(img["id"])
            assert (img["height"], img["width"]) == (128, 160)
            path = root / split / img["file_name"]
            with Image.open(path) as im:
                assert im.format == "JPEG"
                assert im.size == (img["width"], img["height"])
                assert im.mode == "RGB"
            img_anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            assert 1 <= len(img_anns) <= MAX_OBJECTS
            for a in img_anns:
                x, y, w, h = a["bbox"]
                assert all(isinstance(v, float) for v in a["bbox"])
                assert w > 0 and h > 0
                assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
                assert a["area"] == pytest.approx(w * h)
                assert a["iscrowd"] == 0
                assert a["category_id"] in {1, 2, 3, 4, 5}
        # the image folder holds exactly the listed images
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds()))


def test_content_is_diverse(dataset):
    root, _ = dataset
    d = _load_json(root, "train")
    anns = d["annotations"]
    names = {c["id"]: c["name"] for c in d["categories"]}
    assert {names[a["category_id"]] for a in anns} == set(SYNTHETIC_CLASSES)
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in anns])
    assert (areas < 16 * 16).any() and (areas > 48 * 48).any()  # small and large objects
    aspect = np.array([a["bbox"][2] / a["bbox"][3] for a in anns])
    assert (aspect > 2).any() and (aspect < 0.5).any()  # elongated bars both ways
    per_image = {}
    for a in anns:
        per_image.setdefault(a["image_id"], []).append(a["bbox"])
    assert max(len(v) for v in per_image.values()) >= 3

    def overlap(b1, b2):
        return min(b1[0] + b1[2], b2[0] + b2[2]) > max(b1[0], b2[0]) and min(b1[1] + b1[3], b2[1] + b2[3]) > max(b1[1], b2[1])

    assert any(overlap(b1, b2) for boxes in per_image.values() for i, b1 in enumerate(boxes) for b2 in boxes[i + 1 :])


def _edge_pass_rate(root: Path, d: dict, split: str, grow: int = 0) -> float:
    """Fraction of box sides whose inner pixel line differs strongly from the line just outside."""
    passed = total = 0
    files = {i["id"]: i["file_name"] for i in d["images"]}
    cache = {}
    for a in d["annotations"]:
        if a["image_id"] not in cache:
            cache[a["image_id"]] = np.asarray(Image.open(root / split / files[a["image_id"]]).convert("RGB")).astype(np.int64)
        im = cache[a["image_id"]]
        H, W, _ = im.shape
        x, y, w, h = (int(round(v)) for v in a["bbox"])
        x0, y0, x1, y1 = max(0, x - grow), max(0, y - grow), min(W, x + w + grow), min(H, y + h + grow)
        pairs = []
        if y0 > 0:
            pairs.append((im[y0, x0:x1], im[y0 - 1, x0:x1]))
        if y1 < H:
            pairs.append((im[y1 - 1, x0:x1], im[y1, x0:x1]))
        if x0 > 0:
            pairs.append((im[y0:y1, x0], im[y0:y1, x0 - 1]))
        if x1 < W:
            pairs.append((im[y0:y1, x1 - 1], im[y0:y1, x1]))
        for inner, outer in pairs:
            total += 1
            passed += int(np.abs(inner - outer).sum(-1).max() > 60)
    return passed / total


def test_boxes_are_tight_and_objects_visible(dataset):
    root, _ = dataset
    for split in ("train", "val"):
        d = _load_json(root, split)
        # Each side of a tight box touches the object: a strong colour edge along it.
        assert _edge_pass_rate(root, d, split) >= 0.97
    d = _load_json(root, "train")
    # Control: boxes grown by 2 px mostly sit on plain background, so the check discriminates.
    assert _edge_pass_rate(root, d, "train", grow=2) < 0.8

    # Pixels inside boxes differ from the background: mean absolute deviation from the image's
    # per-channel median is larger inside the union of boxes than outside it.
    files = {i["id"]: i["file_name"] for i in d["images"]}
    inside_dev, outside_dev = [], []
    for img_id, name in files.items():
        im = np.asarray(Image.open(root / "train" / name).convert("RGB")).astype(np.float64)
        mask = np.zeros(im.shape[:2], dtype=bool)
        for a in d["annotations"]:
            if a["image_id"] == img_id:
                x, y, w, h = (int(round(v)) for v in a["bbox"])
                mask[y : y + h, x : x + w] = True
        if mask.all():
            continue
        dev = np.abs(im - np.median(im[~mask], axis=0)).sum(-1)
        inside_dev.append(dev[mask].mean())
        outside_dev.append(dev[~mask].mean())
    assert np.mean(inside_dev) > 1.5 * np.mean(outside_dev)


# ------------------------------------------------------------------------------------ VOC
def test_voc_xml_matches_coco(dataset):
    from torchvision.datasets import VOCDetection

    root, _ = dataset
    voc = root / "VOC"
    for split, image_set in (("train", "trainval"), ("val", "test")):
        d = _load_json(root, split)
        names = {c["id"]: c["name"] for c in d["categories"]}
        ids = (voc / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split()
        assert ids == [Path(i["file_name"]).stem for i in d["images"]]
        by_image = {}
        for a in d["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for img in d["images"]:
            stem = Path(img["file_name"]).stem
            assert (voc / "JPEGImages" / img["file_name"]).read_bytes() == (root / split / img["file_name"]).read_bytes()
            tree = ET.parse(voc / "Annotations" / f"{stem}.xml")
            ann = VOCDetection.parse_voc_xml(tree.getroot())["annotation"]
            assert ann["filename"] == img["file_name"]
            assert (int(ann["size"]["width"]), int(ann["size"]["height"]), int(ann["size"]["depth"])) == (160, 128, 3)
            objs = ann["object"]
            coco_anns = by_image[img["id"]]
            assert len(objs) == len(coco_anns)
            for obj, a in zip(objs, coco_anns):
                assert obj["name"] == names[a["category_id"]]
                assert obj["difficult"] == "0" and obj["truncated"] == "0" and obj["pose"] == "Unspecified"
                b = {k: obj["bndbox"][k] for k in ("xmin", "ymin", "xmax", "ymax")}
                assert all(v.isdigit() for v in b.values())  # integers, as in VOC
                xmin, ymin, xmax, ymax = (int(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                assert 1 <= xmin <= xmax <= img["width"] and 1 <= ymin <= ymax <= img["height"]
                x, y, w, h = a["bbox"]
                # documented convention: VOC (xmin-1, ymin-1, xmax, ymax) == COCO (x, y, x+w, y+h)
                assert (xmin - 1, ymin - 1, xmax, ymax) == (x, y, x + w, y + h)


def test_torchvision_vocdetection_reads_layout(dataset, tmp_path):
    from torchvision.datasets import VOCDetection

    root, _ = dataset
    devkit = tmp_path / "VOCdevkit"
    devkit.mkdir()
    (devkit / "VOC2007").symlink_to(root / "VOC", target_is_directory=True)
    for split, image_set, n in (("train", "trainval", NUM_TRAIN), ("val", "test", NUM_VAL)):
        ds = VOCDetection(str(tmp_path), year="2007", image_set=image_set, download=False)
        assert len(ds) == n
        d = _load_json(root, split)
        for k in (0, n - 1):
            image, target = ds[k]
            img = d["images"][k]
            coco_img = np.asarray(Image.open(root / split / img["file_name"]).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(image), coco_img)
            objs = target["annotation"]["object"]
            voc_boxes = sorted((int(o["bndbox"]["xmin"]) - 1, int(o["bndbox"]["ymin"]) - 1, int(o["bndbox"]["xmax"]), int(o["bndbox"]["ymax"])) for o in objs)
            coco_boxes = sorted(
                (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                for a in d["annotations"]
                if a["image_id"] == img["id"]
            )
            assert voc_boxes == coco_boxes


# ------------------------------------------------------------------------------------ determinism / idempotence
def test_deterministic_for_a_seed(tmp_path):
    kw = dict(num_train=6, num_val=3, max_objects=4)
    generate_synthetic_dataset(tmp_path / "a", seed=7, **kw)
    generate_synthetic_dataset(tmp_path / "b", seed=7, **kw)
    generate_synthetic_dataset(tmp_path / "c", seed=8, **kw)
    fa, fb, fc = (_file_bytes(tmp_path / n) for n in "abc")
    assert len(fa) == 2 + 9 * 3 + 2 + 1  # 2 json, 9 x (coco jpg, voc jpg, xml), 2 txt, meta
    assert fa == fb
    assert set(fa) == set(fc)
    assert fa["annotations/instances_train.json"] != fc["annotations/instances_train.json"]
    diff_images = [k for k in fa if k.endswith(".jpg") and fa[k] != fc[k]]
    assert len(diff_images) == 2 * 9  # every image differs with another seed
    # the first images do not depend on how many are requested
    generate_synthetic_dataset(tmp_path / "d", seed=7, num_train=3, num_val=1, max_objects=4)
    assert (tmp_path / "d" / "train" / "000002.jpg").read_bytes() == fa["train/000002.jpg"]


def test_idempotent_and_meta(tmp_path):
    root = tmp_path / "ds"
    kw = dict(num_train=4, num_val=2, seed=1)
    s1 = generate_synthetic_dataset(root, **kw)
    assert s1["generated"] is True
    meta = json.loads((root / "synthetic_meta.json").read_text())
    assert (meta["seed"], meta["num_train"], meta["num_val"], meta["image_size"], meta["max_objects"]) == (1, 4, 2, [128, 160], 5)
    assert meta["num_annotations"] == {"train": len(_load_json(root, "train")["annotations"]), "val": len(_load_json(root, "val")["annotations"])}
    # leave a mark in a generated file: a matching second call must not touch it
    sentinel = root / "train" / "000001.jpg"
    sentinel.write_bytes(b"marker")
    s2 = generate_synthetic_dataset(root, **kw)
    assert s2["generated"] is False and sentinel.read_bytes() == b"marker"
    assert s2["num_annotations"] == s1["num_annotations"]
    # overwrite regenerates
    assert generate_synthetic_dataset(root, overwrite=True, **kw)["generated"] is True
    assert sentinel.read_bytes() != b"marker"
    # other parameters regenerate, old files of the previous dataset do not linger
    s3 = generate_synthetic_dataset(root, num_train=2, num_val=1, seed=1)
    assert s3["generated"] is True
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000001.jpg", "000002.jpg"]
    assert len(list((root / "VOC" / "Annotations").iterdir())) == 3
    assert json.loads((root / "synthetic_meta.json").read_text())["num_train"] == 2
    # a dataset without meta (interrupted) is incomplete and gets regenerated
    (root / "synthetic_meta.json").unlink()
    assert load_synthetic_meta(root) is None
    assert generate_synthetic_dataset(root, num_train=2, num_val=1, seed=1)["generated"] is True
    assert load_synthetic_meta(root) is not None
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temporary leftovers


def test_interrupted_generation_is_not_complete(tmp_path, monkeypatch):
    real = synthetic.render_synthetic_sample
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # simulate a kill midway
        return real(*args, **kwargs)

    root = tmp_path / "ds"
    monkeypatch.setattr(synthetic, "render_synthetic_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_dataset(root, num_train=6, num_val=2, seed=0)
    assert load_synthetic_meta(root) is None
    assert not (root / "synthetic_meta.json").exists()
    monkeypatch.setattr(synthetic, "render_synthetic_sample", real)
    # an existing complete dataset survives a failed regeneration with other parameters
    generate_synthetic_dataset(root, num_train=3, num_val=1, seed=0)
    before = _file_bytes(root)
    calls["n"] = 0
    monkeypatch.setattr(synthetic, "render_synthetic_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_dataset(root, num_train=6, num_val=2, seed=5)
    monkeypatch.setattr(synthetic, "render_synthetic_sample", real)
    assert _file_bytes(root) == before
    assert load_synthetic_meta(root)["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    # and the next complete call works
    s = generate_synthetic_dataset(root, num_train=6, num_val=2, seed=5)
    assert s["generated"] and load_synthetic_meta(root)["num_train"] == 6


def test_refuses_foreign_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(root, num_train=2, num_val=1)
    s = generate_synthetic_dataset(root, num_train=2, num_val=1, overwrite=True)
    assert s["generated"] and (root / "keep.txt").read_text() == "user data"
    assert load_synthetic_meta(root) is not None


@pytest.mark.parametrize("bad", [dict(num_train=-1), dict(max_objects=0), dict(image_size=(16, 160)), dict(seed=-3)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_root_from_env_and_ensure(tmp_path, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert synthetic_dataset_root() == Path("datasets") / "synthetic"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert synthetic_dataset_root() == tmp_path / "synthetic"
    s = ensure_synthetic_dataset(num_train=5, num_val=2)
    assert s["generated"] is True and Path(s["root"]) == tmp_path / "synthetic"
    assert len(_load_json(tmp_path / "synthetic", "train")["images"]) == 5
    # without parameters an existing dataset of any size is reused
    s = ensure_synthetic_dataset()
    assert s["generated"] is False and s["num_images"] == {"train": 5, "val": 2}
    # an explicit parameter that does not match regenerates
    s = ensure_synthetic_dataset(num_train=3)
    assert s["generated"] is True and s["num_images"]["train"] == 3
    assert ensure_synthetic_dataset(num_train=3)["generated"] is False


# ------------------------------------------------------------------------------------ CLI
def test_cli(tmp_path):
    out = tmp_path / "cli_ds"
    cmd = [sys.executable, str(REPO / "tools" / "make_synthetic_dataset.py"), "--out", str(out), "--num-train", "3",
           "--num-val", "2", "--seed", "4", "--image-size", "64", "96", "--max-objects", "2"]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "wrote" in r.stdout
    assert "3 images" in r.stdout and "2 images" in r.stdout
    d = _load_json(out, "train")
    assert len(d["images"]) == 3 and all((i["height"], i["width"]) == (64, 96) for i in d["images"])
    assert max(sum(a["image_id"] == i["id"] for a in d["annotations"]) for i in d["images"]) <= 2
    meta = load_synthetic_meta(out)
    assert (meta["seed"], meta["num_val"], meta["max_objects"]) == (4, 2, 2)
    r2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "up to date" in r2.stdout
    r3 = subprocess.run(cmd + ["--max-objects", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r3.returncode != 0 and "max_objects" in r3.stderr
