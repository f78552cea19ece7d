#!/usr/bin/env python
"""Train or evaluate any detector / distillation config.

    python tools/train_net.py --config-file CONFIG.py [--num-gpus N] [--resume | --eval-only] [key=value ...]

Same as projects/<detector>/train_net.py; see ``tprd.engine.main``.
"""
import os
import sys

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tprd.engine.main import run

if __name__ == "__main__":
    run()
