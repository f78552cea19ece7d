#!/usr/bin/env python
"""Check our detector against a detrex parity fixture (tests/fixtures/reference/README.md).

    python tools/detrex_parity.py FIXTURE_DIR [--dump OUT.pt] [--threads N]

Builds the model from the fixture's ``config.json`` (Deformable DETR, DAB-DETR or DINO, by the
config's ``_target_``), fills the weights with the ``crc32-randn-v1`` rule, loads them strictly,
runs ``input.pt`` (eval, or training with losses, matches and gradients when ``"mode": "train"``)
and, when ``outputs.pt`` exists, prints the largest difference of every compared quantity. Exits 1
when anything is beyond tolerance. ``--dump`` writes our results in the ``outputs.pt`` layout.

An RT-DETRv2 fixture (recognised from ``config.json``) is run by
:func:`tprd.testing.rtdetr_parity.run_rtdetr_fixture`, which reads only ``config.json``,
``keys.json``, ``fill_checksums.json`` and ``input.pt``; ``--dump`` writes the keys of its ``outputs.pt``
(training: with ``losses`` under the reference's names). Exits 1 when the fill or the strict load fails.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tprd.testing.parity import run_fixture  # noqa: E402
from tprd.testing.rtdetr_parity import is_rtdetr_fixture, run_rtdetr_fixture  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", help="fixture folder (config.json, keys.json, input.pt, ...)")
    parser.add_argument("--dump", metavar="OUT.pt", help="write our results in the outputs.pt layout")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if is_rtdetr_fixture(args.fixture):
        result = run_rtdetr_fixture(args.fixture)
        print(result.report())
        if args.dump:
            torch.save(result.dump, args.dump)
            print(f"wrote {args.dump}")
        return 0 if result.ok else 1
    result = run_fixture(args.fixture)
    print(result.report())
    if args.dump:
        torch.save(result.dump, args.dump)
        print(f"wrote {args.dump}")
    if not result.has_reference:
        return 0
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
