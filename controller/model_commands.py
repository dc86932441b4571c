"""``greenfleet models ...``: add, compress, list and show model versions and their variants."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from rich.markup import escape
from rich.table import Table

from agent import protocol as p
from controller.db import open_db
from controller.output import console, emit, fmt, progress_bar, stage_progress
from model_store.build_cost import BuildCost
from model_store.catalog import Catalog, Declared, ModelVersion, Variant, _task
from model_store.errors import ModelStoreError
from model_store.pipeline import compress, profile_added, sign_added
from model_store.signing import Signer
from model_store.variants.base import Calibration

METRIC_LABELS = {"roc_auc": "AUC", "accuracy": "acc", "r2": "R²"}


def variant_row(v: Variant, reference_size: int | None) -> dict[str, Any]:
    """One variant as the CLI shows it; ``--json`` prints these dicts."""
    profile = v.profile
    fidelity = profile.fidelity if profile else None
    latency = profile.latency if profile else {}
    return {
        "id": v.id,
        "variant": v.variant or "(source)",
        "format": v.format.value,
        "precision": v.precision,
        "technique": v.technique,
        "size": v.size,
        "size_ratio": round(v.size / reference_size, 3) if reference_size else None,
        "parameters": profile.parameters if profile else None,
        "nonzero_parameters": profile.nonzero_parameters if profile else None,
        "macs": profile.macs if profile else None,
        "peak_memory_mb": profile.peak_memory_mb if profile else None,
        "latency_p50_ms": {k: s.p50_ms for k, s in latency.items()},
        "latency_p95_ms": {k: s.p95_ms for k, s in latency.items()},
        "metric": fidelity.metric if fidelity else None,
        "metric_value": fidelity.metric_value if fidelity else None,
        "agreement": fidelity.agreement if fidelity else None,
        "correlation": fidelity.correlation if fidelity else None,
        "eligible": v.eligible,
        "reason": v.reason,
        "notes": list(v.notes),
        "signed": v.manifest is not None,
    }


def version_row(version: ModelVersion, variants: list[Variant]) -> dict[str, Any]:
    return {
        "id": version.id,
        "task": version.task.value if version.task else None,
        "inputs": [p.to_builtins(s) for s in version.inputs],
        "outputs": [p.to_builtins(s) for s in version.outputs],
        "accuracy_floor": version.accuracy_floor,
        "threshold": version.threshold,
        "variants": len(variants),
        "eligible": sum(v.eligible for v in variants),
        "has_rules": version.rules is not None,
        "created": version.created,
        "compressed": version.compressed,
        "build_cost": version.build_cost,
    }


def variants_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in (
        "variant",
        "fmt",
        "prec",
        "KB",
        "x fp32",
        "MMAC",
        "ort ms",
        "litert ms",
        "metric",
        "agree",
        "ok",
        "why / notes",
    ):
        if col == "why / notes":  # the full text is in `models show --json`
            table.add_column(col, no_wrap=True, max_width=36, overflow="ellipsis")
        else:
            justify = "left" if col in ("variant", "fmt") else "right"
            table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        why = r["reason"] or "; ".join(r["notes"])
        table.add_row(
            r["variant"],
            r["format"],
            r["precision"] or "-",
            f"{r['size'] / 1024:.0f}",
            fmt(r["size_ratio"]),
            fmt(r["macs"] / 1e6 if r["macs"] is not None else None, 2),
            fmt(r["latency_p50_ms"].get("onnxruntime"), 3),
            fmt(r["latency_p50_ms"].get("litert"), 3),
            "-"
            if r["metric_value"] is None
            else f"{METRIC_LABELS.get(r['metric'], r['metric'])} {r['metric_value']:.3f}",
            fmt(r["agreement"], 3),
            "[green]yes[/]" if r["eligible"] else "[red]no[/]",
            escape(why),
        )
    return table


def _catalog(args: argparse.Namespace) -> Catalog:
    return Catalog(open_db(args.home.prepare().database), args.home.store)


def cmd_add(args: argparse.Namespace) -> int:
    declared = Declared.from_json(Path(args.meta)) if args.meta else Declared()
    if args.task:
        declared = Declared(
            _task(args.task),
            declared.accuracy_floor,
            declared.threshold,
            declared.inputs,
            declared.outputs,
        )
    if args.accuracy_floor is not None:
        declared = Declared(
            declared.task,
            args.accuracy_floor,
            declared.threshold,
            declared.inputs,
            declared.outputs,
        )
    catalog = _catalog(args)
    model = catalog.add(Path(args.path), args.name, args.version, declared=declared)
    unprofiled, profiled_now = None, model.profile is None
    if profiled_now:  # priced on its own runtime from the start, so the plan can place it
        try:
            model = profile_added(catalog, model.id)
        except ModelStoreError as exc:
            unprofiled = f"{exc}; the plan cannot price it until `models compress` runs"
    # the same file again: what it declares now (a forgotten --task, another floor) applies
    changes = catalog.redeclare(model.base, declared) if model.technique == "source" else {}
    signer = Signer.load_or_create(args.home.keys)
    try:  # enrolled agents run only signed manifests
        model, unsigned = sign_added(catalog, signer, model.id), None
    except ModelStoreError as exc:
        unsigned = f"{exc}; enrolled agents will refuse it until it is signed"
    updated = {k: [None if a is None else str(a), str(b)] for k, (a, b) in changes.items()}
    data: dict[str, Any] = {
        "id": model.id,
        "format": model.format.value,
        "sha256": model.sha256,
        "size": model.size,
        "signed_by": signer.key_id if unsigned is None else None,
        "unsigned_because": unsigned,
        "updated": updated,
        "profile": None if model.profile is None else p.to_builtins(model.profile),
        "unprofiled_because": unprofiled,
    }

    def render() -> None:
        for name, (was, now) in updated.items():
            console.print(f"updated {model.base}: {name.replace('_', ' ')} {now} (was {was})")
        console.print(
            f"added {model.id} ({model.format.value}, {model.size:,} bytes, "
            f"sha256 {model.sha256[:12]})"
            + (f", manifest signed with key {signer.key_id}" if unsigned is None else "")
        )
        if unsigned is not None:
            console.print(f"[yellow]not signed[/]: {escape(unsigned)}")
        if model.profile is not None and profiled_now:
            runtime, stats = next(iter(model.profile.latency.items()), ("-", None))
            console.print(
                f"profiled on {runtime}: p50 {stats.p50_ms:.3f} ms, {model.profile.macs / 1e6:.2f}"
                f" M MACs ({model.profile.host})"
                if stats is not None
                else "profiled: no latency measured"
            )
        if unprofiled is not None:
            console.print(f"[yellow]not profiled[/]: {escape(unprofiled)}")

    emit(args, data, render)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    data = [version_row(v, catalog.variants(v.id)) for v in catalog.versions()]

    def render() -> None:
        table = Table(
            "model",
            "task",
            "accuracy floor",
            "variants",
            "eligible",
            "rules",
            "compressed",
            title=f"{len(data)} model versions",
            title_justify="left",
        )
        for r in data:
            table.add_row(
                r["id"],
                r["task"] or "-",
                fmt(r["accuracy_floor"]),
                str(r["variants"]),
                str(r["eligible"]),
                "yes" if r["has_rules"] else "-",
                r["compressed"] or "-",
            )
        console.print(table)

    emit(args, data, render)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    version = catalog.version(args.model)
    variants = catalog.variants(version.id)
    reference = next((v for v in variants if v.variant == "fp32"), None) or next(
        (v for v in variants if v.variant == ""), None
    )
    rows = [variant_row(v, reference.size if reference else None) for v in variants]
    data = {**version_row(version, variants), "variant_list": rows, "rules": version.rules}

    def render() -> None:
        sig = ", ".join(f"{s.name}{s.shape}" for s in version.inputs)
        out = ", ".join(f"{s.name}{s.shape}" for s in version.outputs)
        console.print(
            f"[bold]{version.id}[/] task {data['task'] or '?'}, inputs {sig} -> {out}, "
            f"accuracy floor {fmt(version.accuracy_floor)}"
        )
        console.print(variants_table(f"{len(rows)} variants (size x against fp32)", rows))
        if version.build_cost:
            cost = msgspec.convert(version.build_cost["total"], BuildCost)
            console.print(f"the last compress cost {cost.label()}")
        if version.rules:
            console.print(
                f"rule baseline: {version.rules.get('kind', '?')} on "
                f"{', '.join(f.get('name', '?') for f in version.rules.get('features', []))}"
            )

    emit(args, data, render)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    calibration = Calibration.load(Path(args.calibration)) if args.calibration else None
    signer = Signer.load_or_create(args.home.keys)
    only = [b.strip() for b in args.only.split(",")] if args.only else None
    with progress_bar("compress", disable=args.json) as bar:
        report = compress(
            catalog,
            signer,
            args.model,
            calibration,
            args.home.scratch,
            only=only,
            progress=stage_progress(bar),
            latency_runs=args.runs,
        )
    variants = catalog.variants(report.version.id)
    reference = next((v for v in variants if v.variant == "fp32"), None)
    rows = [variant_row(v, reference.size if reference else None) for v in variants]
    failures = [{"variant": n, "reason": r} for n, r in report.failures]
    data = {
        "model": report.version.id,
        "variants": rows,
        "failures": failures,
        "rules": report.rules,
        "build_cost": catalog.version(report.version.id).build_cost,
    }

    def render() -> None:
        console.print(variants_table(f"{report.version.id}: {len(rows)} variants", rows))
        for f in failures:
            console.print(f"[yellow]not built[/] {f['variant']}: {escape(f['reason'])}")
        if report.cost is not None:
            console.print(f"this compress cost {report.cost.label()}")
        console.print(f"manifests signed with key {signer.key_id} ({args.home.keys})")

    emit(args, data, render)
    return 0


def register(models: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``models`` subcommands to the CLI parser."""
    madd = add(models, "add", cmd_add, "add a model file (.onnx or .tflite) to the catalog", True)
    madd.add_argument("path")
    madd.add_argument("--name", required=True)
    madd.add_argument(
        "--version", required=True, help="semantic version; 1.0.0+NAME imports a variant"
    )
    madd.add_argument("--task", choices=["anomaly", "classification", "regression"])
    madd.add_argument("--accuracy-floor", type=float, help="minimum task metric of a variant")
    madd.add_argument("--meta", help="metadata JSON (task, inputs, outputs, accuracy_floor)")
    add(models, "list", cmd_list, "list model versions", True)
    show = add(models, "show", cmd_show, "show a model version and its variants", True)
    show.add_argument("model", help="NAME:VERSION")
    comp = add(
        models,
        "compress",
        cmd_compress,
        "build, profile and sign the variants of a model version",
        True,
    )
    comp.add_argument("model", help="NAME:VERSION")
    comp.add_argument("--calibration", help=".npz with 'inputs' [N, ...] and optional 'labels'")
    comp.add_argument("--only", help="comma-separated builders (default: all)")
    comp.add_argument("--runs", type=int, default=200, help="latency runs per variant")
