"""Run an RT-DETRv2 parity fixture (``tests/fixtures/reference/rtdetr_parity/``) through our model.

:func:`run_rtdetr_fixture` reads only the fixture's ``config.json``, ``keys.json``,
``fill_checksums.json`` and ``input.pt``: it builds :class:`~tprd.modeling.rt_detr.RTDETR` from the
reference's resolved constructor arguments (``reduced_config``), fills the weights with the
``crc32-randn-v1`` rule (RT-DETR variant, :func:`fill_rtdetr_state_dict`, below),
checks the fill checksums, loads them strictly (:func:`~tprd.checkpoint.rtdetr.load_rtdetr_checkpoint`)
and runs the input as the reference did (eval: model + post-processor; training: forward,
criterion, backward). The result's ``dump`` has the keys of the fixture's ``outputs.pt``;
``intermediates``, ``grads`` and ``buffers`` hold our side of ``intermediates.pt`` and
``grad_checksums.json``. :func:`compare_rtdetr_fixture` compares a result with the stored reference
(the tests' side; it is the only reader of ``outputs.pt`` here).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..checkpoint.rtdetr import _leaf, load_rtdetr_checkpoint
from .fill import fill_value
from .parity import Check, compare_tensors, compare_tree

__all__ = ["is_rtdetr_fixture", "run_rtdetr_fixture", "compare_rtdetr_fixture", "RTDETRParityResult",
           "TOLERANCES"]

#: suggested checks of the fixtures' README (docs/rt_detr.md#parity)
TOLERANCES = {
    "eval": dict(atol=1e-4, rtol=1e-4),
    "eval_pixels": dict(atol=1e-3, rtol=0.0),
    "train_losses": dict(atol=1e-4, rtol=1e-4),
    "train": dict(atol=1e-3, rtol=1e-3),
}


def is_rtdetr_fixture(path) -> bool:
    """True when ``path/config.json`` describes an RT-DETR fixture (``"arch": "rtdetrv2"`` or an
    ``RTDETRTransformerv2`` in its reduced config)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = json.loads(cfg_path.read_text())
    return str(cfg.get("arch", "")).startswith("rtdetr") or "RTDETRTransformerv2" in cfg.get("reduced_config", {})


@dataclass
class RTDETRParityResult:
    fixture: str
    mode: str
    checks: List[Check] = field(default_factory=list)
    dump: Dict[str, Any] = field(default_factory=dict)
    intermediates: Dict[str, Any] = field(default_factory=dict)
    grads: Dict[str, Optional[List[float]]] = field(default_factory=dict)
    grad_global_l2_norm: float = float("nan")
    buffers: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def report(self) -> str:
        head = f"rtdetr parity {self.fixture} ({self.mode}): " + ("OK" if self.ok else "FAILED")
        return "\n".join([head] + [c.line() for c in self.checks])


def _read(path: Path) -> Dict[str, Any]:
    return {
        "config": json.loads((path / "config.json").read_text()),
        "keys": json.loads((path / "keys.json").read_text()),
        "fill_checksums": json.loads((path / "fill_checksums.json").read_text())
        if (path / "fill_checksums.json").is_file() else None,
        "input": torch.load(path / "input.pt", map_location="cpu", weights_only=True),
    }


def build_fixture_model(config: Dict[str, Any]):
    from ..modeling.rt_detr import build_rtdetr_from_reference_config

    torch.manual_seed(0)
    return build_rtdetr_from_reference_config(config["reduced_config"])


def _fill(model, fixture, result: RTDETRParityResult) -> None:
    sd = fill_rtdetr_state_dict(model, fixture["keys"],
                                unit_std_suffixes=tuple(fixture["config"].get("unit_std_suffixes", ()))
                                or ("denoising_class_embed.weight", "tgt_embed.weight"))
    # the non-floating entries (num_batches_tracked, valid_mask) keep the model's values, as the fill says
    full = {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}
    full.update(sd)
    if fixture["fill_checksums"]:
        worst, bad = 0.0, []
        for key, (s, sa, first) in fixture["fill_checksums"].items():
            if key not in full:
                bad.append(key)
                continue
            v = full[key].double()
            ours = (v.sum().item(), v.abs().sum().item(), v.flatten()[0].item())
            for a, b in zip(ours, (s, sa, first)):
                d = 0.0 if a == b else abs(a - b) / max(abs(b), 1.0)  # inf == inf for the anchors
                worst = max(worst, d)
                if not d <= 1e-6:
                    bad.append(key)
        result.checks.append(Check("fill checksums (relative)", worst, not bad,
                                   f"{len(set(bad))} keys off: {sorted(set(bad))[:3]}" if bad else
                                   f"{len(fixture['fill_checksums'])} keys"))
    report = load_rtdetr_checkpoint(model, full, strict=True)
    result.checks.append(Check("strict load of the filled state dict", 0.0, report.ok, f"{len(report.matched)} keys"))


def _stage_dicts(logits: Tensor, boxes: Tensor) -> List[Dict[str, Tensor]]:
    return [{"pred_logits": logits[l].detach(), "pred_boxes": boxes[l].detach()} for l in range(logits.shape[0])]


def _run_eval(model, fixture, result: RTDETRParityResult) -> None:
    inp = fixture["input"]
    images, sizes = inp["images"], inp["orig_target_sizes"]
    model.eval()
    with torch.no_grad():
        outputs = model.forward_outputs(model.images_from_tensor(images))
        main = outputs.main
        dets = model.postprocessor(main.logits[-1], main.boxes[-1], sizes)
    stages = _stage_dicts(main.logits, main.boxes)
    result.dump.update({
        "pred_logits": main.logits[-1].detach(),
        "pred_boxes": main.boxes[-1].detach(),
        "aux_outputs": stages[:-1],
        "all_layers_pred_logits": main.logits.detach(),
        "all_layers_pred_boxes": main.boxes.detach(),
        "enc_outputs": {"pred_logits": outputs.enc["pred_logits"].detach(),
                        "pred_boxes": outputs.enc["pred_boxes"].detach()},
        "enc_topk_indices": outputs.enc["topk_indices"].detach(),
        "orig_target_sizes": sizes,
        "detections": [{"labels": d["labels"], "boxes": d["boxes"], "scores": d["scores"]} for d in dets],
    })
    result.intermediates = model.parity_intermediates(outputs)


def _stats(t: Tensor) -> List[float]:
    t = t.detach().double()
    return [t.sum().item(), t.abs().sum().item(), t.abs().max().item()]


def _run_train(model, fixture, result: RTDETRParityResult) -> None:
    cfg, inp = fixture["config"], fixture["input"]
    images = inp["images"]
    targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in inp["targets"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(int(cfg.get("train", {}).get("rng_seed", 0)))
    outputs = model.forward_outputs(model.images_from_tensor(images), targets=targets)
    crit = model.criterion
    unweighted, matches = crit(outputs, targets, return_indices=True, return_costs=True)
    weighted = crit.weight_losses(unweighted)
    total = sum(weighted.values())
    total.backward()

    main = outputs.main
    stages = _stage_dicts(main.logits, main.boxes)
    enc = {"pred_logits": outputs.enc["pred_logits"].detach(), "pred_boxes": outputs.enc["pred_boxes"].detach()}
    costs = matches.pop("costs")
    order = ["final"] + [f"aux_{i}" for i in range(main.logits.shape[0] - 1)] + ["enc_0"]
    dump = {
        "losses": {k: v.detach().double() for k, v in weighted.items()},
        "losses_unweighted": {k: v.detach().double() for k, v in unweighted.items()},
        "total_loss": total.detach().double(),
        "weight_dict": {k: float(v) for k, v in crit.weight_dict.items()},
        "pred_logits": main.logits[-1].detach(),
        "pred_boxes": main.boxes[-1].detach(),
        "aux_outputs": stages[:-1],
        "all_layers_pred_logits": main.logits.detach(),
        "all_layers_pred_boxes": main.boxes.detach(),
        "enc_aux_outputs": [enc],
        "enc_outputs": enc,
        "targets": targets,
        "num_boxes": float(max(sum(len(t["labels"]) for t in targets), 1)),
        "matches": {k: matches[k] for k in order if k in matches},
        "match_cost_matrices": {k: costs[k] for k in order if k in costs},
        "matcher_call_order": [k for k in order if k in matches],
    }
    if outputs.dn is not None:
        dn = outputs.dn
        meta = dn["dn_meta"]
        dump["dn_aux_outputs"] = _stage_dicts(dn["predictions"].logits, dn["predictions"].boxes)
        dump["dn_meta"] = meta
        dump["dn_matches"] = matches.get("dn")
        dump["dn_num_boxes"] = dump["num_boxes"] * meta["dn_num_group"]
    result.dump.update(dump)
    result.intermediates = model.parity_intermediates(outputs)
    sq = 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            result.grads[name] = None
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        result.grads[name] = _stats(g)
        sq += float((g.double() ** 2).sum())
    result.grad_global_l2_norm = math.sqrt(sq)
    after = model.state_dict()
    for k, v in after.items():
        if not torch.equal(v, before[k]):
            t = v.detach().double()
            result.buffers[k] = [t.sum().item(), t.abs().sum().item(), t.flatten()[0].item()]


def run_rtdetr_fixture(path, model=None) -> RTDETRParityResult:
    """Build (unless given), fill, load and run one RT-DETR fixture folder; never reads its outputs."""
    path = Path(path)
    fixture = _read(path)
    mode = "train" if fixture["config"].get("mode") == "train" else "eval"
    result = RTDETRParityResult(fixture=path.name, mode=mode)
    if model is None:
        model = build_fixture_model(fixture["config"])
    _fill(model, fixture, result)
    (_run_train if mode == "train" else _run_eval)(model, fixture, result)
    return result


# --------------------------------------------------------------------------------------------
# Comparison with the stored reference (tests)
# --------------------------------------------------------------------------------------------


def _match_detections(ours: Dict[str, Tensor], ref: Dict[str, Tensor], tie: float = 1e-5) -> Tensor:
    """Permutation of our detections onto the reference's: identical inside runs of near-tied
    reference scores, matched there by (label, box)."""
    rs = ref["scores"]
    perm = torch.arange(rs.numel())
    start = 0
    for i in range(1, rs.numel() + 1):
        if i == rs.numel() or abs(float(rs[i - 1] - rs[i])) > tie:
            idx = list(range(start, i))
            if len(idx) > 1:
                used = set()
                for j in idx:
                    cand = [k for k in idx if k not in used and int(ours["labels"][k]) == int(ref["labels"][j])]
                    if cand:
                        k = min(cand, key=lambda k: float((ours["boxes"][k] - ref["boxes"][j]).abs().max()))
                        used.add(k)
                        perm[j] = k
            start = i
    return perm


def compare_rtdetr_fixture(result: RTDETRParityResult, path) -> List[Check]:
    """Compare a :func:`run_rtdetr_fixture` result with the fixture's stored ``outputs.pt``,
    ``intermediates.pt`` (+ ``losses.json``, ``grad_checksums.json``) at the README's tolerances."""
    path = Path(path)
    ref = torch.load(path / "outputs.pt", map_location="cpu", weights_only=True)
    inter = torch.load(path / "intermediates.pt", map_location="cpu", weights_only=True) \
        if (path / "intermediates.pt").is_file() else {}
    dump, checks = result.dump, []
    train = result.mode == "train"
    tol = TOLERANCES["train" if train else "eval"]
    for key in ("all_layers_pred_logits", "all_layers_pred_boxes", "pred_logits", "pred_boxes"):
        checks.append(compare_tensors(key, dump.get(key), ref[key], **tol))
    checks += compare_tree("aux_outputs", dump.get("aux_outputs"), ref["aux_outputs"], **tol)
    checks += compare_tree("enc_outputs", dump.get("enc_outputs"), ref["enc_outputs"], **tol)
    if "enc_topk_indices" in ref:
        checks.append(compare_tensors("enc_topk_indices", dump.get("enc_topk_indices"), ref["enc_topk_indices"], 0, 0))
    for key, value in inter.items():
        if key in result.intermediates and result.intermediates[key] is not None:
            checks += compare_tree(f"intermediates.{key}", result.intermediates[key], value, **tol)
    if not train:
        for i, (o, r) in enumerate(zip(dump["detections"], ref["detections"])):
            perm = _match_detections(o, r)
            checks.append(compare_tensors(f"detections[{i}].scores", o["scores"][perm], r["scores"],
                                          **TOLERANCES["eval"]))
            checks.append(compare_tensors(f"detections[{i}].labels", o["labels"][perm], r["labels"], 0, 0))
            checks.append(compare_tensors(f"detections[{i}].boxes", o["boxes"][perm], r["boxes"],
                                          **TOLERANCES["eval_pixels"]))
        return checks
    losses = json.loads((path / "losses.json").read_text())
    for k, v in losses["losses"].items():
        checks.append(compare_tensors(f"losses.{k}", dump["losses"].get(k), torch.tensor(v, dtype=torch.float64),
                                      **TOLERANCES["train_losses"]))
    extra = sorted(set(dump["losses"]) - set(losses["losses"]))
    checks.append(Check("loss keys and order", 0.0, list(dump["losses"]) == list(losses["losses"]),
                        f"extra {extra}" if extra else ""))
    for k, v in losses["losses_unweighted"].items():
        checks.append(compare_tensors(f"losses_unweighted.{k}", dump["losses_unweighted"].get(k),
                                      torch.tensor(v, dtype=torch.float64), **TOLERANCES["train_losses"]))
    checks.append(compare_tensors("total_loss", dump["total_loss"], torch.tensor(losses["total_loss"]).double(),
                                  atol=1e-4 * len(losses["losses"]), rtol=1e-4))
    for layer, per_image in losses["matches"].items():
        for b, m in enumerate(per_image):
            mine = dump["matches"].get(layer)
            ok = mine is not None and mine[b][0].tolist() == m["pred"] and mine[b][1].tolist() == m["gt"]
            checks.append(Check(f"matches.{layer}[{b}]", 0.0 if ok else float("nan"), ok, "exact"))
    for layer, per_image in ref.get("match_cost_matrices", {}).items():
        for b, c in enumerate(per_image):
            checks.append(compare_tensors(f"match_cost_matrices.{layer}[{b}]",
                                          dump["match_cost_matrices"][layer][b], c, **tol))
    checks.append(Check("matcher_call_order", 0.0, dump["matcher_call_order"] == losses["matcher_call_order"]))
    checks += _compare_dn(dump, ref, tol)
    grads_path = path / "grad_checksums.json"
    if grads_path.is_file():
        checks += _compare_grads(result, json.loads(grads_path.read_text()))
    return checks


def _compare_dn(dump: Dict[str, Any], ref: Dict[str, Any], tol: Dict[str, float]) -> List[Check]:
    """The denoising part of a training fixture with ``num_denoising > 0`` (nothing otherwise):
    ``dn_aux_outputs`` at the training tolerance; ``dn_meta``, ``dn_matches`` and ``dn_num_boxes``
    exactly. Their presence on our side is checked too (a missing key fails)."""
    checks: List[Check] = []
    if "dn_aux_outputs" in ref:
        ours = dump.get("dn_aux_outputs")
        n_ours, n_ref = (len(ours) if ours is not None else None), len(ref["dn_aux_outputs"])
        checks.append(Check("dn_aux_outputs layers", 0.0, n_ours == n_ref, f"ours {n_ours}, reference {n_ref}"))
        checks += compare_tree("dn_aux_outputs", ours, ref["dn_aux_outputs"], **tol)
    for key in ("dn_meta", "dn_matches"):
        if key in ref:
            checks += compare_tree(key, dump.get(key), ref[key], 0.0, 0.0)
    if "dn_num_boxes" in ref:
        r = ref["dn_num_boxes"]
        ours = dump.get("dn_num_boxes")
        ok = ours is not None and float(ours) == float(r)
        checks.append(Check("dn_num_boxes", 0.0 if ok else float("nan"), ok, f"ours {ours}, reference {float(r)}"))
    return checks


def _compare_grads(result: RTDETRParityResult, ref: Dict[str, Any]) -> List[Check]:
    """README's gradient checks: ``sum_abs`` rtol 1e-2, ``max_abs`` rtol 3e-2,
    ``|d sum| <= 1e-2 sum_abs + 1e-3``; keys with ``sum_abs < 1e-3`` only need ours < 1e-3 too."""
    bad, worst_sa, worst_ma = [], 0.0, 0.0
    for key, entry in ref["per_key"].items():
        mine = result.grads.get(key, "absent")
        if isinstance(mine, str):
            bad.append(f"{key}: not a parameter here")
            continue
        if entry is None or mine is None:
            if (entry is None) != (mine is None):
                bad.append(f"{key}: requires_grad differs (reference {entry is not None}, ours {mine is not None})")
            continue
        (s, sa, ma), (rs, rsa, rma) = mine, entry
        if rsa < 1e-3:
            if sa >= 1e-3:
                bad.append(f"{key}: sum_abs {sa:.3g}, reference {rsa:.3g} (a zero gradient)")
            continue
        d_sa, d_ma = abs(sa - rsa) / rsa, abs(ma - rma) / max(rma, 1e-12)
        worst_sa, worst_ma = max(worst_sa, d_sa), max(worst_ma, d_ma)
        if d_sa > 1e-2 or d_ma > 3e-2 or abs(s - rs) > 1e-2 * rsa + 1e-3:
            bad.append(f"{key}: sum/sum_abs/max_abs {s:.6g}/{sa:.6g}/{ma:.6g} vs {rs:.6g}/{rsa:.6g}/{rma:.6g}")
    checks = [Check(f"grads per key ({len(ref['per_key'])} keys; worst rel sum_abs)", worst_sa, not bad,
                    "; ".join(bad[:4]) or f"worst rel max_abs {worst_ma:.2g}")]
    rel = abs(result.grad_global_l2_norm - ref["global_l2_norm"]) / ref["global_l2_norm"]
    checks.append(Check("grad global L2 norm (relative)", rel, rel <= 1e-3,
                        f"ours {result.grad_global_l2_norm:.6f} vs {ref['global_l2_norm']:.6f}"))
    buf_bad, worst_b = [], 0.0
    for key, (s, sa, first) in ref.get("buffers_after_forward", {}).items():
        mine = result.buffers.get(key)
        if mine is None:
            buf_bad.append(f"{key}: unchanged here")
            continue
        d = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(mine, (s, sa, first)))
        worst_b = max(worst_b, d)
        if d > 1e-4:
            buf_bad.append(f"{key}: {mine} vs {[s, sa, first]}")
    extra = sorted(set(result.buffers) - set(ref.get("buffers_after_forward", {})))
    if extra:
        buf_bad.append(f"changed here only: {extra[:3]}")
    checks.append(Check("buffers after the training forward (relative)", worst_b, not buf_bad, "; ".join(buf_bad[:3])))
    return checks


def _unit_std(key: str, unit_std_suffixes: Sequence[str]) -> bool:
    return any(key == s or key.endswith("." + s) for s in unit_std_suffixes)


def fill_rtdetr_state_dict(model: nn.Module, keys: Optional[Iterable[Sequence]] = None,
                           unit_std_suffixes: Sequence[str] = ("denoising_class_embed.weight", "tgt_embed.weight"),
                           exempt_leaves: Sequence[str] = ("anchors", "num_points_scale")) -> Dict[str, Tensor]:
    """The ``crc32-randn-v1`` values of every floating state-dict entry of ``model`` (or of the
    ``[key, shape, dtype]`` rows ``keys``), in RT-DETR's variant: keys ending in one of
    ``unit_std_suffixes`` are drawn at unit std; floating buffers whose leaf is in ``exempt_leaves``
    keep the model's constructed values; non-floating entries are not returned."""
    own = model.state_dict()
    rows = keys if keys is not None else [(k, list(v.shape), str(v.dtype)) for k, v in own.items()]
    out: Dict[str, Tensor] = {}
    for key, shape, dtype in sorted(rows, key=lambda r: r[0]):
        if "float" not in str(dtype):
            continue
        if _leaf(key) in exempt_leaves:
            out[key] = own[key].detach().clone()
            continue
        value = fill_value(key, shape)
        if _unit_std(key, unit_std_suffixes) and len(shape) > 1:  # the rule's N(0, 1) draw, unscaled
            gen = torch.Generator(device="cpu")
            gen.manual_seed(zlib.crc32(key.encode("utf-8")))
            value = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        out[key] = value
    return out
