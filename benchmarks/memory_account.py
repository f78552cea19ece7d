#!/usr/bin/env python
"""Where a training step's memory goes: bytes kept for backward per module, and the live-bytes peak.

    python benchmarks/memory_account.py --row student              # default path
    python benchmarks/memory_account.py --row student --variant before
    python benchmarks/memory_account.py --row "DETRDistill_TPRD step" --top 30

Same set-up as ``benchmarks/steps.py`` (rows, variants, 2 random 512x512 images, train mode), one
untimed step first, then one accounted step:

* **kept for backward**: every tensor autograd saves goes through a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook, tagged with the innermost module running
  (global forward pre/post hooks) and named by the autograd node that holds it (a graph walk);
  storages are counted once (a view and its base, or one activation saved by two consumers, count
  once, for the first saver). Grouped by a short module pattern (layer indices replaced by ``*``);
* **live bytes** (``torch.profiler`` with ``profile_memory``): the running sum of the CPU
  allocator's allocations and frees over the step, its peak, the phase (forward / backward) and the
  operator allocating at the peak;
* **peak RSS** of the process (``ru_maxrss``) and its RSS before the step, so the part of the peak
  that no live tensor explains (the allocator's cached / fragmented pages) can be read off.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tools"))

import torch  # noqa: E402

from benchmark import make_batch  # noqa: E402
from steps import ROWS, VARIANTS, build  # noqa: E402

MB = 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def saved_by_node(root) -> dict:
    """``{storage pointer: autograd node name}`` over the graph of ``root`` (what each node saved)."""
    out, stack, seen = {}, [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = []
        if hasattr(node, "saved_tensors"):  # a custom autograd Function
            try:
                tensors += list(node.saved_tensors)
            except RuntimeError:
                pass
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except RuntimeError:
                    continue
                tensors += [v] if isinstance(v, torch.Tensor) else [x for x in v if isinstance(x, torch.Tensor)] \
                    if isinstance(v, (list, tuple)) else []
        for t in tensors:
            out.setdefault(t.untyped_storage().data_ptr(), type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return out


def short(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name) or "(top)"


def account(model, data, top: int):
    names = {id(m): n for n, m in model.named_modules()}
    mod_stack = []
    pre = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: mod_stack.append(names.get(id(m), type(m).__name__)))

    def leave(module, inputs, output):
        mod_stack.pop()  # returns None: the output stays as it is

    post = torch.nn.modules.module.register_module_forward_hook(leave)
    seen = {}
    per = collections.Counter()
    detail = collections.defaultdict(collections.Counter)

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            key = st.data_ptr()
            if key and key not in seen:
                mod = short(mod_stack[-1]) if mod_stack else "(outside modules)"
                seen[key] = (st.nbytes(), mod, f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return t

    pack.observer = True  # the toolbox's own saved-tensor repacking stays on (tprd/layers/saved_tensors.py)
    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = model(data)
    finally:
        pre.remove()
        post.remove()
    total = sum(losses.values())
    nodes = saved_by_node(total.grad_fn)
    for key, (nbytes, mod, what) in seen.items():
        per[mod] += nbytes
        detail[mod][f"{nodes.get(key, '?')} {what}"] += nbytes
    kept = sum(v[0] for v in seen.values())
    del losses, total  # the graph goes with them
    return kept, per, detail


def live_peak(model, data, top: int):
    """Replay the step under the profiler; the live-bytes peak and what is alive at it, by the module
    (forward) or autograd node (backward) that allocated it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    names = {id(m): n for n, m in model.named_modules()}
    ranges = []

    def enter(module, inputs):
        r = record_function("@" + short(names.get(id(module), type(module).__name__)))
        r.__enter__()
        ranges.append(r)

    def leave(module, inputs, output):
        ranges.pop().__exit__(None, None, None)

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    model.zero_grad(set_to_none=True)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("## forward"):
                total = sum(model(data).values())
            with record_function("## backward"):
                total.backward()
            del total
    finally:
        pre.remove()
        post.remove()
    allocs = []

    def walk(node, chain):
        if node.tag.name == "Allocation":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, chain))
            return
        chain = chain + (node.name,)
        for c in node.children:
            walk(c, chain)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, ())
    allocs.sort(key=lambda a: a[0])
    run, peak, at = 0, 0, -1
    for i, (_, size, _, _) in enumerate(allocs):
        run += size
        if run > peak:
            peak, at = run, i
    live = {}
    for _, size, ptr, chain in allocs[:at + 1]:
        if size > 0:
            live[ptr] = (size, chain)
        else:
            live.pop(ptr, None)

    def label(chain):
        phase = next((c[3:] for c in chain if c.startswith("## ")), "before the step")
        mods = [c[1:] for c in chain if c.startswith("@")]
        nodes = [c.split(": ", 1)[1] for c in chain if c.startswith("autograd::engine::evaluate_function")]
        where = mods[-1] if mods else (nodes[-1] if nodes else (chain[-1] if chain else "?"))
        return f"{phase}: {where}"

    groups = collections.Counter()
    for size, chain in live.values():
        groups[label(chain)] += size
    return peak, run, label(allocs[at][3]) if at >= 0 else "?", groups.most_common(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", default="student", help="a row of steps.py, or 'student'")
    parser.add_argument("--variant", default="after", choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true", help="skip the live-bytes profile")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()
    row = "student step (Deformable DETR R18)" if args.row == "student" else args.row
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kind, config = ROWS[row]
    model = build(kind, config, args.variant)
    student = model.student if kind == "distill" else model
    data = make_batch(2, 512, 7, int(student.num_classes), seed=0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    model.zero_grad(set_to_none=True)
    sum(model(data).values()).backward()  # warm-up (kernel build, lazy inits)
    model.zero_grad(set_to_none=True)
    rss_before = rss_mb()
    kept, per, detail = account(model, data, args.top)
    peak_rss_account = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"# {row} | variant {args.variant} | {args.threads} thread(s)")
    print(f"parameters {params / MB:.0f} MB (trainable {trainable / MB:.0f} MB: as much again for their gradients)")
    print(f"RSS before the accounted step {rss_before:.0f} MB; peak RSS so far {peak_rss_account:.0f} MB")
    print(f"kept for backward (unique storages): {kept / MB:.0f} MB")
    print()
    print("| module | MB kept | share |")
    print("|---|---:|---:|")
    for mod, b in per.most_common(args.top):
        print(f"| `{mod}` | {b / MB:.1f} | {b / kept:.1%} |")
    print()
    print("| module | op, shape, dtype | MB kept (all layers) |")
    print("|---|---|---:|")
    items = [(b, mod, what) for mod, c in detail.items() for what, b in c.items()]
    for b, mod, what in sorted(items, reverse=True)[:args.top]:
        print(f"| `{mod}` | `{what}` | {b / MB:.1f} |")
    out = {"row": row, "variant": args.variant, "params_mb": params / MB, "kept_mb": kept / MB,
           "rss_before_mb": rss_before, "per_module_mb": {k: v / MB for k, v in per.items()}}
    if not args.no_profile:
        peak, end, where, groups = live_peak(model, data, args.top)
        print()
        print(f"live-bytes peak over the step (allocations minus frees since the step's start, params and "
              f"inputs not included): {peak / MB:.0f} MB, reached in `{where}`; left at the end {end / MB:.0f} MB")
        print()
        print("| alive at the peak, allocated in | MB |")
        print("|---|---:|")
        for g, b in groups:
            print(f"| `{g}` | {b / MB:.1f} |")
        out.update(live_peak_mb=peak / MB, live_peak_at=where, live_at_peak={g: b / MB for g, b in groups})
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process {out['peak_rss_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
