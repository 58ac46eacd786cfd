"""``zoo verify``: every pinned file, and a reproducibility run of the bundled test input on every engine and
precision the model's entry allows.

fp32 on ONNX Runtime must reproduce the bundled output within ``test.atol``; every other
(engine, precision) must meet that precision's tolerance against it: the label mask's Dice
(per foreground class, after the runner's thresholding) and the largest probability difference.
:func:`select_engine` hands these checks to :func:`zoo.engines.select.select`, which picks for ``auto`` the
fastest allowed combination that this machine can run and that passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.engines.select import EngineChoice, select
from zoo.errors import ModelOutputError, ProviderError, RegistryError
from zoo.registry import (
    ModelEntry,
    Registry,
    check_cache_dir,
    checked_afresh,
    remember_pass,
    remembered,
    verified_weights,
)

_CHECKED: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
#: the same key -> a passing result read from :func:`check_cache_dir` (never returned by :func:`check_precision`)
_REMEMBERED: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}

#: engine name -> the distribution whose version a remembered check depends on
ENGINE_DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",), "torch": ("torch",),
}  # fmt: skip


def _remembered_key(entry: ModelEntry, registry: Registry, engine: str, precision: str) -> str | None:
    """What a check's result depends on, hashed: the network file and the bundled test (sha256), the engine
    and its installed version, the precision and its tolerances, this CPU's instruction sets, zoo's version.
    None when the engine's version cannot be read (never remembered then)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from zoo import __version__
    from zoo.engines.common import cpu_flags
    from zoo.registry import sha256_file

    versions = []
    for dist in ENGINE_DISTRIBUTIONS.get(engine, ()):
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    if not versions or entry.test is None:
        return None
    test = [sha256_file(registry.resolve(f)) for f in (entry.test.input, entry.test.expected)]
    parts = [entry.id, entry.weights_for(precision).sha256, *test, repr(entry.test), repr(entry.output), engine,
             *versions, precision, repr(entry.precisions[precision]), " ".join(sorted(cpu_flags())), __version__]  # type: ignore[index]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def remembered_check(entry: ModelEntry, registry: Registry, engine: str, precision: str) -> dict[str, Any]:
    """:func:`check_precision`, or its earlier *passing* result for exactly the same files, engine version,
    precision, tolerances and CPU (see :func:`_remembered_key`), kept in :func:`check_cache_dir`. A run
    uses this (the check costs 0.2-1 s a network); ``zoo verify`` always checks afresh. A failure is never
    remembered. The result says ``remembered`` and when it was checked."""
    memo = _memo_key(entry, engine, precision)
    known = _CHECKED.get(memo) or _REMEMBERED.get(memo)  # a batch of slides asks once per slide: answer from memory
    if known is not None:
        return known
    key = _remembered_key(entry, registry, engine, precision) if check_cache_dir() is not None else None
    if key is None:
        return check_precision(entry, registry, engine, precision)
    res = remembered(key)
    if res is not None and res.get("engine") == engine and res.get("precision") == precision:
        detail = f"{res.get('detail', '')} (checked {res.get('checked')})"
        _REMEMBERED[memo] = {**res, "remembered": True, "detail": detail}
        return _REMEMBERED[memo]
    res = check_precision(entry, registry, engine, precision)
    if res.get("ok") is True:
        remember_pass(key, res)
    return res


def _memo_key(entry: ModelEntry, engine: str, precision: str) -> tuple[str, str, str, str, str]:
    """What a check's result is kept under for the life of the process."""
    spec = entry.precisions[precision]  # type: ignore[index]
    return (entry.id, entry.weights_for(precision).sha256, engine, precision, repr(spec))


def check_precision(entry: ModelEntry, registry: Registry, engine: str, precision: str) -> dict[str, Any]:
    """Run the bundled test on ``engine`` at ``precision`` and compare with the bundled fp32 output.

    Returns ``ok``, ``skipped`` (a reason, when this machine cannot run it), ``dice``, ``max_abs_diff``
    and the tolerances. Results are kept for the life of the process.
    """
    from zoo.engines.model import OnnxModel, to_probabilities
    from zoo.engines.select import engine_unavailable
    from zoo.runner import labels_from_probabilities

    spec = entry.precisions[precision]  # type: ignore[index]
    key = _memo_key(entry, engine, precision)
    if key in _CHECKED:
        return _CHECKED[key]
    base = {
        "engine": engine,
        "precision": precision,
        "min_dice": spec.min_dice,
        "min_agreement": spec.min_agreement,
        "max_abs_diff_allowed": spec.max_abs_diff,
    }
    reason = engine_unavailable(engine, precision)
    if reason:
        return {**base, "ok": False, "skipped": reason}
    path = verified_weights(entry, registry, precision)
    if entry.test is None:
        res = {**base, "ok": precision == "fp32", "skipped": None if precision == "fp32" else "no bundled test"}
        _CHECKED[key] = res
        return res
    x, expected = (_load_test_array(entry, registry, f) for f in (entry.test.input, entry.test.expected))
    try:
        # a static batch as large as the test: the default (8) would run, and hold, 8 tiles for a 1-tile test
        # (cd-unet's 512 px: 1 GB peak RSS and 4x the time)
        n = len(next(iter(x.values())) if isinstance(x, dict) else x)
        model = OnnxModel(path, entry, ["CPUExecutionProvider"], engine=engine, precision=precision, batch_size=n)
        got = model.raw(x)
    except ProviderError as err:
        return {**base, "ok": False, "skipped": str(err)}
    if got.shape != expected.shape:
        res = {**base, "ok": False, "error": f"output shape {got.shape} != bundled {expected.shape}"}
        _CHECKED[key] = res
        return res
    raw_diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    try:
        pg = to_probabilities(got, entry)
        pe = to_probabilities(expected, entry)
    except ModelOutputError as err:  # NaN weights, wrong activation: a failure, never "ok"
        res = {**base, "ok": False, "error": str(err)}
        _CHECKED[key] = res
        return res
    prob_diff = float(np.abs(pg - pe).max())
    dices, same, total = [], 0, 0
    for a, b in zip(pg, pe):
        la, lb = labels_from_probabilities(a, entry), labels_from_probabilities(b, entry)
        same, total = same + int((la == lb).sum()), total + la.size
        for c in entry.foreground:
            s = int((la == c.index).sum()) + int((lb == c.index).sum())
            dices.append(1.0 if s == 0 else 2.0 * int(((la == c.index) & (lb == c.index)).sum()) / s)
    dice = float(min(dices)) if dices else 1.0
    agreement = same / total if total else 1.0
    if engine == "onnxruntime" and precision == "fp32":
        ok = raw_diff <= entry.test.atol
        detail = f"max |diff| {raw_diff:.2e} (tolerance {entry.test.atol:.0e})"
    else:
        ok = dice >= spec.min_dice and agreement >= spec.min_agreement and prob_diff <= spec.max_abs_diff
        detail = f"Dice {dice:.5f} (>= {spec.min_dice}), labels as fp32 {agreement:.5f}"
        detail += f" (>= {spec.min_agreement})" if spec.min_agreement else ""
        detail += f", max |p diff| {prob_diff:.2e} (<= {spec.max_abs_diff:g})"
    res = {**base, "ok": ok, "dice": dice, "agreement": agreement, "max_abs_diff": prob_diff,
           "raw_max_abs_diff": raw_diff, "detail": detail}  # fmt: skip
    _CHECKED[key] = res
    return res


def verify_model(entry: ModelEntry, registry: Registry) -> dict[str, Any]:
    """Check every network (cascade stage) of ``entry``: pinned files and bundled test on every allowed
    engine and precision (see :func:`verify_network`); ``stages`` holds one result per stage."""
    nets = entry.networks()
    with checked_afresh():  # the files' graphs are read again, not taken from a run's remembered checks
        if len(nets) == 1:
            return verify_network(entry, registry)
        results = {name: verify_network(view, registry) for name, view in nets}
    return {
        "model": entry.id,
        "ok": all(r["ok"] for r in results.values()),
        "max_abs_diff": max((r.get("max_abs_diff") or 0.0) for r in results.values()),
        "atol": min((r.get("atol") or 1.0) for r in results.values()),
        "detail": " | ".join(f"stage {name}: {r['detail']}" for name, r in results.items()),
        "checks": [{**c, "stage": name} for name, r in results.items() for c in r["checks"]],
        "stages": results,
    }


def verify_network(entry: ModelEntry, registry: Registry) -> dict[str, Any]:
    """Check one network's pinned files and its bundled test on every allowed engine and precision.

    Returns ``ok`` (the files, fp32 on ONNX Runtime and every combination this machine can run pass),
    ``model``, ``detail`` and ``checks`` (one per combination, with ``skipped`` reasons).

    Raises:
        ChecksumMismatchError, WeightsNotFoundError: the weights are not the pinned ones.
    """
    for precision in entry.precisions:  # the fp32 file and every precision's own copy
        verified_weights(entry, registry, precision)
    if entry.test is None:
        return {"model": entry.id, "ok": True, "detail": "sha256 ok; no bundled test", "checks": []}
    checks = [
        check_precision(entry, registry, eng, prec) for prec, spec in entry.precisions.items() for eng in spec.engines
    ]
    ref = check_precision(entry, registry, "onnxruntime", "fp32")  # cached: the very result listed in ``checks``
    ok = bool(ref["ok"]) and all(c["ok"] for c in checks if not c.get("skipped"))
    parts = [f"sha256 ok; fp32 onnxruntime {ref.get('detail', ref.get('error'))}"]
    for c in checks:
        if c is ref:
            continue
        state = (
            f"skipped ({c['skipped']})"
            if c.get("skipped")
            else ("ok" if c["ok"] else "FAIL") + f" {c.get('detail', c.get('error'))}"
        )
        parts.append(f"{c['precision']} {c['engine']}: {state}")
    return {
        "model": entry.id,
        "ok": ok,
        "max_abs_diff": ref.get("raw_max_abs_diff"),
        "atol": entry.test.atol,
        "detail": "; ".join(parts),
        "checks": checks,
    }


def select_engine(
    entry: ModelEntry, registry: Registry, engine: str = "auto", precision: str = "auto", gpu: set[str] | None = None
) -> EngineChoice:
    """:func:`zoo.engines.select.select` with :func:`remembered_check` as the check: the fastest allowed
    (engine, precision) that passes its bundled test here (or the requested one, which must pass).

    Raises:
        ProviderError: no allowed combination can run, or an explicit one fails.
    """
    return select(entry, lambda e, p: remembered_check(entry, registry, e, p), engine, precision, gpu)


def _load_test_array(entry: ModelEntry, registry: Registry, name: str) -> Any:
    """A bundled test array (``.npy``), or ``{input name: array}`` (``.npz``, multi-input networks)."""
    path = registry.resolve(name)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as err:
        what = "not found" if not path.exists() else "is a folder" if path.is_dir() else "not a .npy array"
        raise RegistryError(
            f"{path}: bundled test file of {entry.id} {what}; restore it (reinstall the package) or fix test: "
            f"in {registry.path}"
        ) from err


def write_test_io(entry: ModelEntry, registry: Registry, slide_path: str, input_path: str, expected_path: str) -> float:
    """Make ``entry``'s bundled test: one real input from ``slide_path`` and the model's output for it.

    The input is the centre patch (tiled models, at the model's target resolution) or the
    whole-slide thumbnail (whole-slide models), preprocessed as the runner does.
    Returns the fraction of foreground pixels in the expected output (a sanity figure).
    """
    from PIL import Image

    from zoo.engines.model import OnnxModel
    from zoo.slide import choose_level, model_dimensions, open_slide, read_scaled, thumbnail

    model = OnnxModel(verified_weights(entry, registry), entry, providers=["CPUExecutionProvider"])
    pw, ph = entry.input.patch_size_px
    with open_slide(slide_path) as slide:
        if entry.input.mode == "whole-slide":
            thumb, _ = thumbnail(slide, 2048)
            tile = np.asarray(Image.fromarray(thumb).resize((pw, ph), Image.Resampling.BILINEAR))
        else:
            choice = choose_level(slide, target_mpp=entry.input.target_mpp)
            w, h = model_dimensions(slide, choice)
            tile = read_scaled(slide, choice, max(0, (w - pw) // 2), max(0, (h - ph) // 2), pw, ph)
    x = model.preprocess(tile[None])
    y = model.raw(x)
    np.save(input_path, x)
    np.save(expected_path, y)
    return float((y >= entry.output.threshold).mean())
