#!/usr/bin/env bash
# Distillation training (the TPRD README's example: Deformable DETR R50 -> R18, DETRDistill + TPRD,
# 2 GPUs x 8 images = total batch 16).
#
#   bash train_distill.sh                                   # the example below
#   CONFIG=projects/dino/cfg_distill/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep.py bash train_distill.sh
#   NUM_GPUS=8 bash train_distill.sh train.max_iter=1000    # extra arguments are config overrides
#
# Output: ./output/<detector>/<Method>/<config name>/ (OUTPUT_DIR to change it), e.g.
# ./output/deformable_detr/DETRDistill_TPRD/deformable_detr_r50_distill_r18_50ep/model_final.pth
#
# Configs: projects/<detector>/cfg_distill/<Method>[_TPRD]/<detector>_r50_distill_r18_<schedule>[_voc].py
# for detector in deformable_detr, dab_detr, dino and Method in DETRDistill, KD_DETR. The original
# README and train_distill.sh spell the file names "..._r50_distll_r18_..." (sic); the files here are
# spelt "..._r50_distill_r18_...".
#
# The teacher and the student backbone come from one merged checkpoint (see README / merge_weight.py):
#   python merge_weight.py --input1 resnet18-f37072fd.pth --input2 <teacher>.pth \
#       --output init/deformable_detr_r50_distill_r18.pth
set -euo pipefail

CONFIG=${CONFIG:-projects/deformable_detr/cfg_distill/DETRDistill_TPRD/deformable_detr_r50_distill_r18_50ep.py}
NUM_GPUS=${NUM_GPUS:-2}
TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-16}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}

# projects/<detector>/train_net.py of the config's detector
PROJECT=$(echo "$CONFIG" | sed -E 's#^(.*projects/[^/]+)/.*#\1#')
# ./output/<detector>/<Method>/<config name>, the folder train_net.py derives from the config's path
# when train.output_dir is not set (evaluate.sh then writes into <that folder>/eval_model_final/)
OUTPUT_DIR=${OUTPUT_DIR:-./output/$(basename "$PROJECT")/$(basename "$(dirname "$CONFIG")")/$(basename "$CONFIG" .py)}

python "$PROJECT/train_net.py" \
    --config-file "$CONFIG" \
    --num-gpus "$NUM_GPUS" \
    train.output_dir="$OUTPUT_DIR" \
    dataloader.train.total_batch_size="$TOTAL_BATCH_SIZE" \
    "$@"
