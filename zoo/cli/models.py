"""``zoo list``, ``zoo info`` and ``zoo verify``: the registered models."""

from __future__ import annotations

import argparse
from typing import Any

from zoo.cli.common import print_result
from zoo.errors import ZooError


def add_list(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo list`` command's options."""
    p = sub.add_parser("list", help="list registered models", formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_list(args: argparse.Namespace) -> int:
    from zoo.registry import load_registry

    reg = load_registry(args.registry)
    rows: list[dict[str, Any]] = [
        {
            "id": m.id,
            "kind": m.kind,
            "task": m.task,
            "stages": [name for name, _ in m.networks()],
            "default": m.name == reg.default_model,
            "licence": m.licence,
            "summary": m.summary,
            "warning": m.warning,
        }
        for m in reg.models
    ]
    if args.json:
        print_result(rows, True)
    else:
        print(f"{'MODEL':<24} {'KIND':<21} {'TASK':<20} SUMMARY")
        for r in rows:
            kind = r["kind"] + (f" ({'+'.join(r['stages'])})" if len(r["stages"]) > 1 else "")
            print(f"{r['id']:<24} {kind:<21} {r['task']:<20} {'(default) ' if r['default'] else ''}{r['summary']}")
            if r["warning"]:
                print(f"{'':<24} WARNING: {r['warning']}")
    return 0


def add_info(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo info`` command's options."""
    p = sub.add_parser("info", help="show one model's registry entry", formatter_class=fmt)
    p.add_argument("model", help="NAME or NAME@VERSION")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_info(args: argparse.Namespace) -> int:
    from zoo.registry import load_registry

    reg = load_registry(args.registry)
    entry = reg.get(args.model)
    data = entry.model_dump(mode="json")
    data["versions"] = reg.versions(entry.name)
    data["weights"]["path"] = str(reg.resolve(entry.weights.uri))
    if args.json:
        print_result(data, True)
        return 0
    print(model_card_text(entry, reg))
    return 0


def model_card_text(entry: Any, reg: Any) -> str:
    """A readable summary of a registry entry (``zoo info``)."""
    spec, out, w = entry.input, entry.output, entry.weights
    lines = [f"{entry.id}  ({entry.task}{', default model' if entry.name == reg.default_model else ''})"]
    lines.append(f"  {entry.summary}")
    if entry.warning:
        lines.append(f"  WARNING: {entry.warning}")
    lines.append(f"  versions: {', '.join(reg.versions(entry.name))}")
    lines.append("  classes:")
    lines += [f"    {c.index:>3}  {c.name:<16} colour {tuple(c.color)}" for c in entry.classes]
    if spec.mode == "tiled":
        lines.append(
            f"  input: {spec.patch_size_px[0]}x{spec.patch_size_px[1]} px tiles at {spec.target_mpp:g} µm/px, "
            f"{spec.overlap:.0%} overlap, {spec.channels} channels {spec.channel_order}, pixel x {spec.scale:.4g} "
            f"then (- mean {list(spec.mean)}) / std {list(spec.std)}"
        )
    else:
        lines.append(f"  input: the whole slide resized to {spec.patch_size_px[0]}x{spec.patch_size_px[1]} px")
    if spec.trained_mpp:
        lines.append(f"  trained at: {', '.join(f'{m:g}' for m in spec.trained_mpp)} µm/px")
    lines.append(f"  output: {out.channels} channel(s), {out.activation}, threshold {out.threshold:g}")
    files = [w.uri, *(f.path for f in w.files)]
    lines.append(f"  weights: {', '.join(files)} (sha256 {w.sha256[:12]}…, checked before every use)")
    precisions = []
    for name, p in entry.precisions.items():
        own = f"; {p.weights.uri}, sha256 {p.weights.sha256[:12]}…" if p.weights else ""
        precisions.append(f"{name} ({', '.join(p.engines)}{own})")
    lines.append(f"  precisions: {', '.join(precisions)}")
    lines.append(f"  licence: {entry.licence}")
    for key in ("trained_by", "source", "training_data", "labels"):
        if key in entry.provenance:
            lines.append(f"  {key.replace('_', ' ')}: {entry.provenance[key]}")
    for k, v in entry.metrics.items():
        if isinstance(v, (int, float)):
            lines.append(f"  {k.replace('_', ' ')}: {v:g}")
    if entry.card:
        lines.append(f"  model card: {reg.resolve(entry.card)}")
    lines.append("  machine-readable: zoo info --json " + entry.id)
    return "\n".join(lines)


def add_verify(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo verify`` command's options."""
    p = sub.add_parser(
        "verify", help="check weights' sha256 and reproduce each model's bundled test output", formatter_class=fmt
    )
    p.add_argument("model", nargs="?", default=None, help="NAME[@VERSION] (default: every model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_verify(args: argparse.Namespace) -> int:
    from zoo.registry import load_registry
    from zoo.verify import verify_model

    reg = load_registry(args.registry)
    entries = [reg.get(args.model)] if args.model else reg.models
    results = []
    for e in entries:
        try:
            results.append(verify_model(e, reg))
        except ZooError as err:
            results.append({"model": e.id, "ok": False, "error": str(err)})
    if args.json:
        print_result(results, True)
    else:
        for r in results:
            state = "ok  " if r["ok"] else "FAIL"
            print(f"{state} {r['model']}: {r.get('detail') or r.get('error')}")
    return 0 if all(r["ok"] for r in results) else 1
