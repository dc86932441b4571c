"""Which recorded benchmark figures are stale: their code changed after they were measured.

``benchmarks/README.md`` keeps a ledger ("Last runs"): for every benchmark, the date and commit
of its last run and the figure it gave. This module knows which paths each benchmark measures
(``PATHS``) and asks git whether any of them changed after the recorded commit. A figure
measured before such a change is stale, and the ledger must say so.

    python -m benchmarks.freshness           # print the ledger with what git says; exit 1 if
                                             # the README calls a stale figure current
    python -m benchmarks.freshness --mark    # write the status column from what git says

Without git history (an exported tree, a shallow clone missing the commit) a status cannot be
worked out: it is printed as unknown and never fails the check.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
BEGIN, END = "<!-- ledger:begin -->", "<!-- ledger:end -->"

# What each benchmark measures: a change under any of these paths can move its figure.
PATHS: dict[str, tuple[str, ...]] = {
    "blob_budget": ("controller/blobs.py", "benchmarks/blob_budget.py"),
    "model_push": (
        "agent/protocol.py",
        "agent/transfer.py",
        "agent/service.py",
        "agent/link.py",
        "agent/activation.py",
        "controller/blobs.py",
        "controller/daemon.py",
        "benchmarks/model_push.py",
        "benchmarks/rig.py",
    ),
    "inference_overhead": (
        "agent/protocol.py",
        "agent/service.py",
        "agent/results.py",
        "agent/telemetry.py",
        "agent/runtime",
        "benchmarks/inference_overhead.py",
    ),
    "agent_memory": ("agent", "pyproject.toml", "benchmarks/agent_memory.py"),
    "resilience": ("agent", "benchmarks/resilience.py", "benchmarks/rig.py"),
    "variants": ("model_store", "agent/runtime", "agent/rules.py", "benchmarks/variants.py"),
    "green_claim": (
        "model_store",
        "controller/planning.py",
        "controller/selection.py",
        "device_configs",
        "benchmarks/green_claim.py",
        "benchmarks/planning.py",
    ),
    "large_compress": (
        "model_store",
        "controller/model_commands.py",
        "controller/output.py",
        "benchmarks/large_compress.py",
    ),
    "planning": (
        "controller/planning.py",
        "controller/selection.py",
        "device_configs",
        "benchmarks/planning.py",
    ),
    "rollout_abort": (
        "controller/rollout.py",
        "controller/rollouts_job.py",
        "controller/reconcile.py",
        "controller/daemon.py",
        "agent/fallback.py",
        "benchmarks/rollout_abort.py",
    ),
    "ingest": (
        "controller/ingest.py",
        "controller/ingest_workers.py",
        "controller/db.py",
        "controller/daemon.py",
        "simulator",
        "benchmarks/ingest.py",
    ),
    "fleet_rollout": (
        "controller/blobs.py",
        "controller/daemon.py",
        "controller/reconcile.py",
        "agent/protocol.py",
        "agent/transfer.py",
        "simulator",
        "benchmarks/fleet_rollout.py",
    ),
    "telemetry_reads": (
        "controller/db.py",
        "controller/views.py",
        "controller/metrics.py",
        "controller/energy.py",
        "benchmarks/telemetry_reads.py",
    ),
}


@dataclass(frozen=True)
class Entry:
    """One row of the ledger."""

    name: str
    date: str
    commit: str
    figure: str
    status: str


def parse_ledger(text: str) -> list[Entry]:
    """The ledger rows between the markers of ``text``; ValueError naming what is wrong."""
    try:
        body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    except IndexError:
        raise ValueError(
            f"no ledger in the README: add the table between {BEGIN} and {END}"
        ) from None
    rows = [line for line in body.splitlines() if line.startswith("|")][2:]  # header, rule
    entries = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 5:
            raise ValueError(f"ledger row {row!r} has {len(cells)} cells, expected 5")
        name, date, commit, figure, status = cells
        entries.append(Entry(name.strip("`"), date, commit.strip("`"), figure, status))
    return entries


def render_ledger(entries: list[Entry]) -> str:
    lines = [
        "| benchmark | last run | commit | figure | status |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{e.name}` | {e.date} | `{e.commit}` | {e.figure} | {e.status} |" for e in entries
    ]
    return "\n".join(lines)


def status(changes: list[str] | None) -> str:
    """The status of a figure given the commits that changed its paths since its run (None:
    git could not tell)."""
    if changes is None:
        return "unknown (no git history of that commit)"
    if not changes:
        return "current"
    return f"**stale**: {len(changes)} change(s) since, latest `{changes[0]}`"


def changes_since(commit: str, paths: tuple[str, ...], repo: Path = REPO) -> list[str] | None:
    """Short hashes of the commits after ``commit`` that touch ``paths``, newest first."""
    run = subprocess.run(
        ["git", "log", "--format=%h", f"{commit}..HEAD", "--", *paths],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        return None
    return run.stdout.split()


def disagreements(entries: list[Entry], worked_out: dict[str, str]) -> list[str]:
    """Rows the README calls current although git says they are stale, and benchmarks with no
    row at all."""
    problems = [
        f"{e.name}: the README says current, but its code changed since `{e.commit}`"
        for e in entries
        if e.status == "current" and worked_out[e.name].startswith("**stale**")
    ]
    named = {e.name for e in entries}
    problems += [f"{name}: no row in the ledger" for name in PATHS if name not in named]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.freshness", description=__doc__)
    parser.add_argument("--mark", action="store_true", help="write the status column")
    args = parser.parse_args(argv)
    text = README.read_text()
    try:
        entries = parse_ledger(text)
    except ValueError as exc:
        print(f"benchmarks.freshness: {exc}", file=sys.stderr)
        return 2
    unknown = [e.name for e in entries if e.name not in PATHS]
    if unknown:
        print(f"benchmarks.freshness: ledger names unknown benchmarks {unknown}", file=sys.stderr)
        return 2
    worked_out = {e.name: status(changes_since(e.commit, PATHS[e.name])) for e in entries}
    if args.mark:
        marked = [replace(e, status=worked_out[e.name]) for e in entries]
        start, rest = text.split(BEGIN, 1)
        end = rest.split(END, 1)[1]
        README.write_text(f"{start}{BEGIN}\n{render_ledger(marked)}\n{END}{end}")
        entries = marked
    width = max(len(e.name) for e in entries)
    print("benchmark figures (benchmarks/README.md, Last runs) against git:")
    for e in entries:
        plain = re.sub(r"[*`]", "", worked_out[e.name])
        print(f"  {e.name:<{width}}  {e.date}  {e.commit:<9}  {plain}")
    problems = disagreements(entries, worked_out)
    for problem in problems:
        print(f"benchmarks.freshness: {problem}", file=sys.stderr)
    if problems:
        print(
            "benchmarks.freshness: run those benchmarks and record them in the ledger, or mark "
            "them stale with `python -m benchmarks.freshness --mark`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
