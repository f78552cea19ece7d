"""Run a detrex parity fixture (tests/fixtures/reference/README.md) through our model and compare.

A fixture folder holds ``config.json`` (the reduced detrex config), ``keys.json`` (detrex state
dict keys), ``fill_checksums.json``, ``input.pt`` and, when the reference was produced,
``outputs.pt`` / ``intermediates.pt`` (+ ``losses.json``, ``grad_checksums.json`` for training
fixtures). :func:`run_fixture` builds the model from the config (dispatch on ``_target_``), fills
the weights with the ``crc32-randn-v1`` rule in detrex key space, loads them strictly through
:func:`~tprd.checkpoint.detrex.load_detrex_checkpoint`, runs the input and returns every
comparison with its largest difference.

What it uses of a detector: its detrex adapter (:mod:`tprd.checkpoint.detrex`: ``build``,
``to_ours``, ``key_map`` -- for gradients; ``None`` derives it with marker tensors, see
:func:`marker_key_map` -- and ``parity_intermediates``, the ``intermediates.pt`` layout) and the
model's ``preprocess``, ``prepare_targets``, ``forward_outputs``, ``inference(outputs,
image_sizes)``, ``model(batched_inputs)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from tprd.checkpoint.detrex import adapter_for, adapter_for_config, load_detrex_checkpoint

from .fill import fill_state_dict

__all__ = [
    "Check",
    "ParityResult",
    "load_fixture",
    "model_class_for",
    "build_model",
    "fill_model",
    "run_fixture",
    "marker_key_map",
]

# tolerances of the fixtures (tests/fixtures/reference/README.md)
TOL_PRED = dict(atol=1e-4, rtol=1e-4)
TOL_PIXEL = dict(atol=1e-3, rtol=0.0)
TOL_LOSS = dict(atol=1e-4, rtol=1e-4)
TIE_GAP = 1e-5

@dataclass
class Check:
    """One compared quantity: its largest absolute difference and whether it is within tolerance."""

    quantity: str
    max_abs: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        flag = "ok  " if self.ok else "FAIL"
        diff = "-" if self.max_abs is None or math.isnan(self.max_abs) else f"{self.max_abs:.3g}"
        return f"[{flag}] {self.quantity:<55} max|diff| {diff:>9}  {self.note}"


@dataclass
class ParityResult:
    fixture: str
    checks: List[Check] = field(default_factory=list)
    dump: Dict[str, Any] = field(default_factory=dict)
    has_reference: bool = False

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> List[Check]:
        return [c for c in self.checks if not c.ok]

    def report(self) -> str:
        head = f"parity {self.fixture}: " + (
            ("OK" if self.ok else f"{len(self.failures)} FAILED") if self.has_reference else "no outputs.pt (ran only)"
        )
        return "\n".join([head] + [c.line() for c in self.checks])


# --------------------------------------------------------------------------------------------
# Fixture loading, model building, weight fill
# --------------------------------------------------------------------------------------------


def load_fixture(path) -> Dict[str, Any]:
    """Everything in a fixture folder (absent files are ``None``)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a parity fixture folder (no config.json)")

    def js(name):
        p = path / name
        return json.loads(p.read_text()) if p.is_file() else None

    def pt(name):
        p = path / name
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None

    return {
        "path": path,
        "config": js("config.json"),
        "keys": js("keys.json"),
        "fill_checksums": js("fill_checksums.json"),
        "losses": js("losses.json"),
        "grad_checksums": js("grad_checksums.json"),
        "input": pt("input.pt"),
        "outputs": pt("outputs.pt"),
        "intermediates": pt("intermediates.pt"),
    }


def model_class_for(reduced_config: Dict[str, Any]):
    """Our detector class for a detrex ``_target_`` (through the adapter registry)."""
    return adapter_for_config(reduced_config).model_class


def build_model(fixture: Dict[str, Any]) -> nn.Module:
    reduced = fixture["config"]["reduced_config"]
    adapter = adapter_for_config(reduced)
    torch.manual_seed(0)
    return adapter.build(reduced)


def fill_model(model: nn.Module, fixture: Dict[str, Any]) -> Tuple[Dict[str, Tensor], List[Check]]:
    """Fill in detrex key space, verify ``fill_checksums.json``, load strictly. Returns the filled
    detrex state dict and the checks."""
    cfg = fixture["config"]
    sd = fill_state_dict(fixture["keys"], cfg.get("alias_groups", []))
    checks = []
    if fixture["fill_checksums"]:
        worst, bad = 0.0, []
        for key, (s, sa, first) in fixture["fill_checksums"].items():
            v = sd[key].double()
            ours = (v.sum().item(), v.abs().sum().item(), v.flatten()[0].item())
            for a, b in zip(ours, (s, sa, first)):
                d = abs(a - b) / max(abs(b), 1.0)
                worst = max(worst, d)
                if d > 1e-6:
                    bad.append(key)
        checks.append(Check("fill checksums (relative)", worst, not bad, f"{len(bad)} keys off" if bad else ""))
    report = load_detrex_checkpoint(model, sd, strict=True)
    checks.append(Check("strict load of the filled detrex state dict", 0.0, report.ok, f"{len(report.matched)} keys"))
    return sd, checks


# --------------------------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------------------------


def _leaves(obj: Any, prefix: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _max_abs(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs().masked_fill(both_inf, 0.0)
    return d.max().item() if d.numel() else 0.0


def compare_tensors(name: str, ours: Any, ref: Any, atol: float, rtol: float) -> Check:
    if not torch.is_tensor(ref):
        return Check(name, float("nan"), ours == ref, f"reference {ref!r}, ours {ours!r}" if ours != ref else "")
    if not torch.is_tensor(ours):
        return Check(name, float("nan"), False, f"missing in our outputs (got {type(ours).__name__})")
    if tuple(ours.shape) != tuple(ref.shape):
        return Check(name, float("nan"), False, f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    if ref.dtype == torch.bool or not ref.is_floating_point():
        equal = bool(torch.equal(ours.to(ref.dtype), ref))
        return Check(name, 0.0 if equal else float((ours.long() != ref.long()).sum()), equal, "exact")
    a, b = ours.detach().double(), ref.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    close = ((a - b).abs() <= atol + rtol * b.abs()) | both_inf
    return Check(name, _max_abs(a, b), bool(close.all()), f"atol={atol:g} rtol={rtol:g}")


def compare_tree(name: str, ours: Any, ref: Any, atol: float, rtol: float) -> List[Check]:
    """Compare every tensor leaf of ``ref`` with the same path in ``ours``."""
    ours_leaves = dict(_leaves(ours, name))
    checks = []
    for path, r in _leaves(ref, name):
        if r is None:
            continue
        checks.append(compare_tensors(path, ours_leaves.get(path), r, atol, rtol))
    return checks


def compare_detections(name: str, ours: Sequence[Dict[str, Tensor]], ref: Sequence[Dict[str, Any]]) -> List[Check]:
    """Scores (1e-4), pixel boxes (1e-3), labels exactly; order compared only where the reference's
    adjacent score gaps exceed 1e-5 (inside near-ties, compared as sets)."""
    checks = []
    if len(ours) != len(ref):
        return [Check(f"{name}: images", float("nan"), False, f"{len(ours)} vs {len(ref)}")]
    for i, (o, r) in enumerate(zip(ours, ref)):
        tag = f"{name}[{i}]"
        rs, os_ = r["scores"], o["scores"].detach().cpu()
        if rs.shape != os_.shape:
            checks.append(Check(f"{tag}.count", float("nan"), False, f"{os_.numel()} vs {rs.numel()} detections"))
            continue
        # clusters of near-tied reference scores
        gaps = (rs[:-1] - rs[1:]).abs() <= TIE_GAP
        cluster = torch.zeros(rs.numel(), dtype=torch.long)
        if rs.numel() > 1:
            cluster[1:] = torch.cumsum((~gaps).long(), 0)
        perm = torch.arange(rs.numel())
        ob, ol = o["boxes"].detach().cpu(), o["labels"].detach().cpu()
        for c in cluster.unique():
            idx = (cluster == c).nonzero().flatten()
            if idx.numel() > 1:  # match inside the tie by (label, box distance)
                used = set()
                for j in idx.tolist():
                    cand = [k for k in idx.tolist() if k not in used and int(ol[k]) == int(r["labels"][j])]
                    if not cand:
                        continue
                    k = min(cand, key=lambda k: float((ob[k] - r["boxes"][j]).abs().max()))
                    used.add(k)
                    perm[j] = k
        checks.append(compare_tensors(f"{tag}.scores", os_[perm], rs, **TOL_PRED))
        checks.append(compare_tensors(f"{tag}.labels", ol[perm], r["labels"], 0, 0))
        checks.append(compare_tensors(f"{tag}.boxes (pixels)", ob[perm], r["boxes"], **TOL_PIXEL))
        ties = int((cluster.bincount() > 1).sum())
        if ties:
            checks[-1].note += f"; {ties} near-tie group(s) matched as sets"
    return checks


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def marker_key_map(keys: Sequence[Sequence], alias_groups: Sequence[Sequence[str]],
                   convert: Callable[[Dict[str, Tensor]], Dict[str, Tensor]]) -> Dict[str, str]:
    """Reference key -> our parameter/buffer name, read off ``convert`` (a checkpoint converter):
    every ``(key, shape, dtype)`` row, or alias group (which shares one value), becomes a distinct
    constant, and each constant is looked up where it landed (the first of our names holding it)."""
    group_of = {k: gi for gi, group in enumerate(alias_groups) for k in group}
    ids: Dict[Any, float] = {}
    markers = {}
    for k, shape, dtype in keys:
        gid = ("g", group_of[k]) if k in group_of else ("k", k)
        ids.setdefault(gid, float(len(ids) + 1))
        markers[k] = torch.full(tuple(shape), ids[gid]) if "float" in dtype else torch.zeros(tuple(shape))
    by_id: Dict[float, str] = {}
    for ours, v in convert(markers).items():
        if v.numel():
            by_id.setdefault(float(v.flatten()[0]), ours)
    out = {}
    for k, _, _ in keys:
        if markers[k].numel():
            name = by_id.get(float(markers[k].flatten()[0]))
            if name is not None:
                out[k] = name
    return out


def _key_map(model: nn.Module, fixture: Dict[str, Any]) -> Dict[str, str]:
    """detrex key -> our parameter/buffer name: the adapter's own map, else derived with markers."""
    adapter = adapter_for(model)
    own = adapter.key_map([k for k, _, _ in fixture["keys"]])
    if own is not None:
        return own
    return marker_key_map(fixture["keys"], fixture["config"].get("alias_groups", []), adapter.to_ours)


def _train_inputs(batched_inputs):
    out = []
    for x in batched_inputs:
        x = dict(x)
        if "gt_boxes_xyxy" in x and "gt_boxes" not in x:
            x["gt_boxes"] = x.pop("gt_boxes_xyxy")
        out.append(x)
    return out


def _predictions(model, outputs) -> Dict[str, Any]:
    main = outputs.main
    res = {
        "all_layers_pred_logits": main.logits.detach(),
        "all_layers_pred_boxes": main.boxes.detach(),
        "pred_logits": main.logits[-1].detach(),
        "pred_boxes": main.boxes[-1].detach(),
        "aux_outputs": [
            {"pred_logits": main.logits[l].detach(), "pred_boxes": main.boxes[l].detach()}
            for l in range(main.logits.shape[0] - 1)
        ],
    }
    if outputs.enc is not None:
        enc = {k: v.detach() for k, v in outputs.enc.items() if k in ("pred_logits", "pred_boxes") and v is not None}
        if outputs.enc.get("topk_indices") is not None:
            enc["enc_topk_proposals"] = outputs.enc["topk_indices"].detach()
        res["enc_outputs"] = enc
    return res


def _det_to_plain(dets):
    return [{k: v.detach().cpu() for k, v in d.items() if k in ("scores", "labels", "boxes")} for d in dets]


def _run_eval(model, fixture, result: ParityResult) -> None:
    inputs = fixture["input"]["batched_inputs"]
    ref = fixture["outputs"]
    model.eval()
    with torch.no_grad():
        images = model.preprocess(inputs)
        outputs = model.forward_outputs(images)
        before = _det_to_plain(model.inference(outputs, images.image_sizes))
        after = _det_to_plain(model(inputs))
    preds = _predictions(model, outputs)
    result.dump.update(preds)
    result.dump["detections_before_detector_postprocess"] = [
        {**d, "image_size": tuple(s)} for d, s in zip(before, images.image_sizes)
    ]
    result.dump["detections"] = after
    if ref is None:
        return
    _compare_predictions(preds, ref, result)
    if "detections_before_detector_postprocess" in ref:
        result.checks += compare_detections("detections_before_detector_postprocess", before,
                                            ref["detections_before_detector_postprocess"])
    if "detections" in ref:
        result.checks += compare_detections("detections", after, ref["detections"])
    _compare_intermediates(model, outputs, fixture, result)


def _compare_predictions(preds, ref, result: ParityResult) -> None:
    for key in ("all_layers_pred_logits", "all_layers_pred_boxes", "pred_logits", "pred_boxes"):
        if key in ref:
            result.checks.append(compare_tensors(key, preds.get(key), ref[key], **TOL_PRED))
    if "enc_outputs" in ref and ref["enc_outputs"] is not None:
        ours = preds.get("enc_outputs", {})
        for k, v in ref["enc_outputs"].items():
            if torch.is_tensor(v) and not v.is_floating_point():
                result.checks.append(compare_tensors(f"enc_outputs.{k}", ours.get(k), v, 0, 0))
            else:
                result.checks += compare_tree(f"enc_outputs.{k}", ours.get(k), v, **TOL_PRED)


def _compare_intermediates(model, outputs, fixture, result: ParityResult) -> None:
    ref = fixture["intermediates"]
    if ref is None:
        return
    ours = adapter_for(model).parity_intermediates(model, outputs)
    for key, value in ref.items():
        if key not in ours:
            continue
        result.checks += compare_tree(f"intermediates.{key}", ours[key], value, **TOL_PRED)


def _run_train(model, fixture, result: ParityResult) -> None:
    inputs = _train_inputs(fixture["input"]["batched_inputs"])
    ref = fixture["outputs"]
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(inputs)
    total = sum(losses.values())
    total.backward()
    result.dump["losses"] = {k: v.detach() for k, v in losses.items()}
    result.dump["total_loss"] = total.detach()
    with torch.no_grad():
        images = model.preprocess(inputs)
        outputs = model.forward_outputs(images)
        targets = model.prepare_targets(inputs)
        indices = _matches(model, outputs, targets)
    result.dump.update(_predictions(model, outputs))
    result.dump["matches"] = indices
    if ref is None:
        return
    ref_losses = ref.get("losses", {})
    for k, v in ref_losses.items():
        result.checks.append(compare_tensors(f"losses.{k}", losses.get(k, None) if k in losses else None,
                                             torch.as_tensor(v, dtype=torch.float64), **TOL_LOSS))
    extra = sorted(set(losses) - set(ref_losses))
    if extra:
        result.checks.append(Check("loss keys", float("nan"), False, f"not in reference: {extra}"))
    if "total_loss" in ref:
        result.checks.append(compare_tensors("total_loss", total.detach(), torch.as_tensor(ref["total_loss"]).double(),
                                             atol=1e-4 * max(1, len(ref_losses)), rtol=1e-4))
    for layer, per_image in (ref.get("matches") or {}).items():
        mine = indices.get(layer)
        for b, (src, tgt) in enumerate(per_image):
            if mine is None:
                result.checks.append(Check(f"matches.{layer}[{b}]", float("nan"), False, "not produced"))
                continue
            ok = torch.equal(mine[b][0].cpu(), torch.as_tensor(src)) and torch.equal(mine[b][1].cpu(), torch.as_tensor(tgt))
            result.checks.append(Check(f"matches.{layer}[{b}]", 0.0 if ok else float("nan"), ok, "exact"))
    costs = ref.get("match_cost_matrices")
    matcher = getattr(getattr(model, "criterion", None), "matcher", None)
    if costs and matcher is not None and hasattr(matcher, "cost_matrix"):
        main = outputs.main
        cost, sizes = matcher.cost_matrix(main.logits, main.boxes, targets)
        for layer, per_image in costs.items():
            l = _layer_index(layer, main.logits.shape[0])
            if l is None:
                continue
            for b, c in enumerate(per_image):
                result.checks.append(compare_tensors(f"match_cost_matrices.{layer}[{b}]", cost[l, b, :, :sizes[b]],
                                                     c, atol=1e-4, rtol=1e-4))
    _compare_predictions(_predictions(model, outputs), ref, result)
    _compare_intermediates(model, outputs, fixture, result)
    _compare_grads(model, fixture, result)


def _layer_index(name: str, num_stages: int) -> Optional[int]:
    if name == "final":
        return num_stages - 1
    if name.startswith("aux_"):
        return int(name[4:])
    return None


def _matches(model, outputs, targets) -> Dict[str, Any]:
    criterion = model.criterion
    try:
        _, idx = criterion(outputs, targets, return_indices=True)
        stages, enc = idx["stages"], idx.get("enc")
    except TypeError:
        main = outputs.main
        stages, enc = criterion.matcher.match_stages(main.logits, main.boxes, targets), None
    n = len(stages)
    out = {"final": stages[-1]}
    for l in range(n - 1):
        out[f"aux_{l}"] = stages[l]
    if enc is not None:
        out["enc"] = enc
    return out


def _compare_grads(model, fixture, result: ParityResult) -> None:
    ref = fixture["grad_checksums"]
    if not ref:
        return
    kmap = _key_map(model, fixture)
    params = dict(model.named_parameters())
    bad, worst_sa, worst_ma, worst_s = [], 0.0, 0.0, 0.0
    seen, sq = set(), 0.0
    for key, entry in ref["per_key"].items():
        p = params.get(kmap.get(key))
        if p is None:
            bad.append(f"{key}: no parameter (mapped to {kmap.get(key)!r})")
            continue
        g = p.grad
        if entry is None:
            if g is not None and g.abs().sum() > 0:
                bad.append(f"{key}: gets a gradient, reference has none")
            continue
        if g is None:
            bad.append(f"{key}: no gradient, reference has one")
            continue
        g = g.double()
        if kmap[key] not in seen:
            seen.add(kmap[key])
            sq += float((g * g).sum())
        s, sa, ma = g.sum().item(), g.abs().sum().item(), g.abs().max().item()
        rs, rsa, rma = entry
        d_sa, d_ma, d_s = abs(sa - rsa), abs(ma - rma), abs(s - rs)
        worst_sa = max(worst_sa, d_sa / max(abs(rsa), 1e-12))
        worst_ma = max(worst_ma, d_ma / max(abs(rma), 1e-12))
        worst_s = max(worst_s, d_s / (1e-4 * rsa + 1e-3))
        if d_sa > 1e-3 + 1e-3 * abs(rsa) or d_ma > 1e-5 + 1e-3 * abs(rma) or d_s > 1e-4 * rsa + 1e-3:
            bad.append(f"{key}: ours sum/sum_abs/max_abs {s:.6g}/{sa:.6g}/{ma:.6g} vs {rs:.6g}/{rsa:.6g}/{rma:.6g}")
    note = "; ".join(bad[:5]) + (f" ... (+{len(bad) - 5})" if len(bad) > 5 else "")
    result.checks.append(Check(f"grads per key ({len(ref['per_key'])} keys, worst rel sum_abs)", worst_sa, not bad,
                               note or f"worst rel max_abs {worst_ma:.2g}, worst sum/(bound) {worst_s:.2g}"))
    if "global_l2_norm" in ref:
        norm = math.sqrt(sq)
        rel = abs(norm - ref["global_l2_norm"]) / ref["global_l2_norm"]
        result.checks.append(Check("grad global L2 norm (relative)", rel, rel <= 1e-4,
                                   f"ours {norm:.6f} vs {ref['global_l2_norm']:.6f}"))


def run_fixture(path, model: Optional[nn.Module] = None) -> ParityResult:
    """Build (unless given), fill, load and run one fixture; compare when ``outputs.pt`` exists."""
    fixture = load_fixture(path)
    result = ParityResult(fixture=Path(path).name, has_reference=fixture["outputs"] is not None)
    if model is None:
        model = build_model(fixture)
    _, checks = fill_model(model, fixture)
    result.checks += checks
    if fixture["config"].get("mode") == "train":
        _run_train(model, fixture, result)
    else:
        _run_eval(model, fixture, result)
    return result
