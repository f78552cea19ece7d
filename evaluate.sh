#!/usr/bin/env bash
# Evaluate a trained (distilled) model: the student's detections on the config's test set.
#
#   CHECKPOINT=output/.../model_final.pth bash evaluate.sh
#   CONFIG=projects/dino/cfg_distill/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep.py \
#       CHECKPOINT=output/.../model_final.pth bash evaluate.sh
#
# CHECKPOINT may be a checkpoint written by train_distill.sh (student + teacher) or any file that
# loads into the config's model; extra arguments are config overrides. The log, config and
# coco_instances_results.json go to a fresh folder next to the checkpoint,
# <checkpoint dir>/eval_<checkpoint name>/ (-2, -3 ... for later evaluations), e.g. after the
# default train_distill.sh run:
#   CHECKPOINT=./output/deformable_detr/DETRDistill_TPRD/deformable_detr_r50_distill_r18_50ep/model_final.pth \
#       bash evaluate.sh     # -> .../deformable_detr_r50_distill_r18_50ep/eval_model_final/
# (add train.output_dir=DIR to choose the folder yourself).
set -euo pipefail

CONFIG=${CONFIG:-projects/deformable_detr/cfg_distill/DETRDistill_TPRD/deformable_detr_r50_distill_r18_50ep.py}
CHECKPOINT=${CHECKPOINT:?set CHECKPOINT=path/to/checkpoint.pth}
NUM_GPUS=${NUM_GPUS:-1}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

PROJECT=$(echo "$CONFIG" | sed -E 's#^(.*projects/[^/]+)/.*#\1#')

python "$PROJECT/train_net.py" \
    --config-file "$CONFIG" \
    --num-gpus "$NUM_GPUS" \
    --eval-only \
    train.init_checkpoint="$CHECKPOINT" \
    "$@"
