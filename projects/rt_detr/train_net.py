#!/usr/bin/env python
"""Train or evaluate a config of this project (detrex command line).

    python projects/rt_detr/train_net.py --config-file CONFIG.py [--num-gpus N] [--resume | --eval-only] [key=value ...]

Thin wrapper around the shared entry point ``tprd.engine.main`` (run from the repository root).
"""
import os
import sys

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tprd.engine.main import run

if __name__ == "__main__":
    run()
