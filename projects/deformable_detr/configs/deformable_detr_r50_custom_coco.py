"""Deformable DETR R50 on your own COCO-format dataset: copy this file and edit the block marked EDIT.

Where to register a dataset: here, at the top of the config. A config is Python that every process
runs when it loads the config (``train_net.py``, each GPU process of ``--num-gpus N``, ``torchrun``
workers, ``--eval-only``), so the names exist wherever the loaders and the evaluator are built.
(``config.yaml`` in the output folder holds the settings but does not register: run the ``.py``.)

The expected layout (edit ``_ROOT`` and the split tuples for another one)::

    $DETECTRON2_DATASETS/my_dataset/annotations/instances_train.json   # COCO instances json
    $DETECTRON2_DATASETS/my_dataset/annotations/instances_val.json
    $DETECTRON2_DATASETS/my_dataset/train/   # images; "file_name" in the json is relative to it
    $DETECTRON2_DATASETS/my_dataset/val/

Classes come from the json's ``categories`` (sorted by id, labels 0..C-1); ``model.num_classes``
must equal their number (a mismatch stops the run naming the override that fixes it). To try the
file before your data is ready, generate a stand-in with this layout and 5 classes::

    python tools/make_synthetic_dataset.py --out datasets/my_dataset
    python projects/deformable_detr/train_net.py \\
        --config-file projects/deformable_detr/configs/deformable_detr_r50_custom_coco.py \\
        train.output_dir=./output/my_dataset train.device=cpu train.max_iter=100 \\
        dataloader.train.total_batch_size=2

That command runs, but the model is the full COCO recipe (R50, 6 + 6 layers, 300 queries, images
up to 1333 px): about 85 s an iteration on a CPU. It is meant for a GPU; on a CPU shrink the model
and the images as ``tests/test_custom_dataset_config.py`` does, or start from
``deformable_detr_r18_synthetic.py``. Check the data first:
``python tools/check_dataset.py --config-file <this file>`` (docs/datasets.md, "Check your set-up").

Everything else is ``deformable_detr_r50_50ep.py`` (COCO recipe, AdamW 2e-4, batch 16): set
``train.max_iter`` (and the lr milestones of ``lr_multiplier``) for the size of your data, and
``train.init_checkpoint`` to an ImageNet ResNet-50 (torchvision ``resnet50-0676ba61.pth``) or to
an official detrex Deformable DETR checkpoint to fine-tune from. For distillation, put the same
registration and names into a copy of a ``cfg_distill`` config and set ``num_classes`` of the
teacher and the student.
"""
import os

from tprd.data import DatasetCatalog, MetadataCatalog, datasets_root, register_coco_instances

from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

# ---- EDIT: your dataset ---------------------------------------------------------------------------
_ROOT = os.path.join(datasets_root(), "my_dataset")  # or an absolute path
_TRAIN = ("my_dataset_train", "annotations/instances_train.json", "train")  # name, json, image folder
_VAL = ("my_dataset_val", "annotations/instances_val.json", "val")
model.num_classes = 5  # the number of categories in your json
# ---------------------------------------------------------------------------------------------------

for _name, _json, _images in (_TRAIN, _VAL):
    # loading the config again (another process, a second run in one Python) registers afresh
    DatasetCatalog.remove(_name)
    MetadataCatalog.remove(_name)
    register_coco_instances(_name, os.path.join(_ROOT, _json), os.path.join(_ROOT, _images))

dataloader.train.dataset.names = _TRAIN[0]
dataloader.test.dataset.names = _VAL[0]  # the COCO evaluator follows the test set

train.output_dir = "./output/deformable_detr_r50_custom_coco"
