#!/usr/bin/env python
"""Check our distillers against the reference implementation's, term by term.

    python tools/distill_parity.py --fixture DIR [--json OUT] [--quiet]
    python tools/distill_parity.py --all ROOT [--json OUT]
    python tools/distill_parity.py --all              # the fixtures copied into this repository

For each fixture (layout: tests/fixtures/reference/distill_parity/README.md) it builds our own COCO
config of the fixture's method and detector with the fixture's reduction as config overrides and
the reference-compatibility flags, fills and loads the reference's keys through the normal
init-checkpoint path, replays the recorded random draws, runs one training step and prints per
loss term the reference value, ours and the difference, then the gradient checks. Exit status 0
only if every reference key is mapped and every check passes.

``--json OUT`` writes, per fixture, ``{"fixture", "pass", "terms": [{"ref_key", "key", "ref",
"ours", "abs_diff"}], "unmapped_ref_keys", "grad_global_norm": {"ref", "ours"}}`` (one object with
``--fixture``, a list of them with ``--all``).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tprd.testing.distill_parity import (  # noqa: E402
    default_distill_fixture_root,
    find_distill_fixtures,
    run_distill_fixture,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--fixture", metavar="DIR", help="one fixture folder (config.json, keys.json, losses.json, ...)")
    which.add_argument("--all", metavar="ROOT", nargs="?", const="",
                       help="every fixture below ROOT (default: $TPRD_REFERENCE_DIR/distill_parity, else the "
                            "repository's tests/fixtures/reference/distill_parity)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="summary lines only, no per-term table")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.fixture is not None:
        folders = [Path(args.fixture)]
        if not (folders[0] / "config.json").is_file():
            parser.error(f"{folders[0]} is not a distillation fixture folder (no config.json)")
    else:
        root = Path(args.all) if args.all else default_distill_fixture_root()
        folders = find_distill_fixtures(root)
        if not folders:
            parser.error(f"no distillation fixtures (folders with config.json and losses.json) below {root}")

    results = []
    for folder in folders:
        try:
            result = run_distill_fixture(folder)
        except Exception as e:  # a fixture that cannot even run is a failure of that fixture
            from tprd.testing.distill_parity import DistillParityResult

            result = DistillParityResult(str(folder))
            result.errors.append(f"{type(e).__name__}: {e}")
        results.append(result)
        # one fixture: the per-term table; --all: each fixture's summary, then one table
        print(result.report(verbose=args.fixture is not None and not args.quiet), flush=True)

    if len(results) > 1 or args.all is not None:
        print()
        print(f"{'fixture':<34} {'terms':>5} {'max |diff|':>11} {'grad norm rel':>14}  result")
        for r in results:
            g = r.grad_global_norm
            rel = abs(g["ours"] - g["ref"]) / abs(g["ref"]) if g else float("nan")
            print(f"{r.fixture:<34} {len(r.terms):>5} {r.max_abs_diff:>11.2e} {rel:>14.2e}  {'PASS' if r.passed else 'FAIL'}")
        print(f"{sum(r.passed for r in results)}/{len(results)} fixtures pass")
    if args.json:
        payload = results[0].to_json() if args.fixture is not None else [r.to_json() for r in results]
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
