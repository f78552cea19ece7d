"""The README's custom-dataset example: ``deformable_detr_r50_custom_coco.py`` registers its COCO
jsons when loaded, trains and evaluates on them (a tiny generated dataset in the config's layout)."""
import json
from argparse import Namespace
from pathlib import Path

import pytest

from tprd.data import MetadataCatalog
from tprd.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
from tprd.engine.main import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "projects/deformable_detr/configs/deformable_detr_r50_custom_coco.py"

# the config's model, data recipe and batch shrunk to seconds on a CPU
SMALL = [
    "train.device=cpu", "train.max_iter=2", "train.log_period=1", "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentation.1.short_edge_length=[64]",
    "dataloader.train.mapper.augmentation.1.max_size=80", "dataloader.train.mapper.augmentation_with_crop=None",
    "dataloader.test.mapper.augmentation.0.short_edge_length=64", "dataloader.test.mapper.augmentation.0.max_size=80",
    "model.transformer.encoder.num_layers=1", "model.transformer.decoder.num_layers=1", "model.aux_loss=False",
    "model.num_queries=10", "model.select_box_nums_for_evaluation=10",
]


def test_custom_coco_config_trains_and_evaluates(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    generate_synthetic_dataset(root / "my_dataset", num_train=4, num_val=2, seed=5, image_size=(64, 80))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    out = tmp_path / "run"
    args = Namespace(config_file=str(CONFIG), resume=False, eval_only=False, num_gpus=1, num_machines=1,
                     machine_rank=0, dist_url="auto", opts=[f"train.output_dir={out}", *SMALL])
    results = main(args)

    # the config registered the names with this dataset's files and classes
    meta = MetadataCatalog.get("my_dataset_val")
    assert meta.json_file == str(root / "my_dataset/annotations/instances_val.json")
    assert list(meta.thing_classes) == list(SYNTHETIC_CLASSES)
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert sorted({r["iteration"] for r in records if "total_loss" in r}) == [0, 1]
    assert 0.0 <= results["bbox"]["AP"] <= 100.0
    predictions = json.loads((out / "coco_instances_results.json").read_text())
    assert predictions and {p["image_id"] for p in predictions} <= {5, 6}  # the 2 val images (ids after train)
    assert (out / "model_final.pth").is_file()


def test_custom_coco_config_class_count_mismatch_names_the_fix(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    generate_synthetic_dataset(root / "my_dataset", num_train=2, num_val=1, seed=5, image_size=(64, 80))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    args = Namespace(config_file=str(CONFIG), resume=False, eval_only=False, num_gpus=1, num_machines=1,
                     machine_rank=0, dist_url="auto", opts=[f"train.output_dir={tmp_path / 'run'}", *SMALL,
                                                            "model.num_classes=7"])
    with pytest.raises(ValueError, match="model.num_classes=5"):
        main(args)
