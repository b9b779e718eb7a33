"""Crash-safety report: SIGKILL and Ctrl-C trials on real ``zooscan scan`` processes in
every phase of their work, and scans that run out of disk.

What it does:

1. **Files chains.** ``--chains`` times: a fresh store, then ``len(FILE_CHAIN)`` runs of
   ``zooscan scan --source files`` over ``--models`` safetensors checkpoints (two
   kernel shapes, so two patch bases on ``synthetic:n=300``), each stopped in the
   phase its kind names (:func:`crash_helpers.files_trial`): SIGKILL while a basis is
   computed, after a random number of commits, or as soon as a compaction starts
   writing the new main file; Ctrl-C (SIGINT) while a basis is computed or after some
   commits. Then one run to the end.
2. **Hub chain.** A loopback hub (``tests/hub_server.py``, 30 ms per request) serving
   ``--models`` tiny transformers ViT repositories; ``--hub-trials`` runs of
   ``zooscan scan --source hf`` SIGKILLed after a random number of commits plus a
   random delay (the phase is ``fetch`` when the hub was answering a request at that
   moment); then one run to the end.
3. **Full disk.** A scan of 30 small then 6 large models with ``RLIMIT_FSIZE`` below a
   large model's journal entry, and on a 6 MB tmpfs filled to its last 400 kB (when
   this process may mount one); each followed by a run with the space back.

After every stop: the store opens, and every model any run of the chain reported as
stored (``stored NAME``) is present and bit-identical (weight, energy, projections,
layer metadata) to the store of an uninterrupted scan of the same models; bases too.
At the end of a chain the store equals the uninterrupted scan's (timestamps and fetch
counters excepted). Ctrl-C'd runs must exit with status 130 after printing their
summary; full-disk runs with status 1 and one ``Error:`` line.

Run: ``.venv/bin/python benchmarks/report_crash.py [--models 200] [--chains 5]
[--hub-trials 16] [--seed 1]`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FILE_CHAIN = (
    "basis",
    "interrupt-basis",
    "commit",
    "compaction",
    "commit",
    "interrupt",
    "compaction",
    "commit",
    "compaction",
    "commit",
)
"""The stops of one files chain, in order (a basis can only be killed while the store
has none)."""
N_SMALL, N_LARGE, FSIZE_LIMIT = 30, 6, 200_000


@dataclass
class Row:
    """One line of the trials table."""

    trials: int = 0
    committed: int = 0
    lost: int = 0
    altered: int = 0
    clean_exits: int = 0
    """Ctrl-C: exit 130 with the summary; full disk: exit 1 with one Error line."""


@dataclass
class Report:
    """Everything the tables print."""

    rows: dict[str, Row] = field(default_factory=lambda: collections.defaultdict(Row))
    chains: list[tuple[str, bool, int]] = field(default_factory=list)
    """(chain, final store equals the reference, models) per chain."""
    notes: list[str] = field(default_factory=list)


def _check_chain_trial(helpers, kind, store, source, trial, reference, tally, report) -> None:
    """Check the store a stopped run left and count the stop in its table row."""
    before_lost, before_altered = len(tally.lost), len(tally.altered)
    helpers.check_after_kill(store, source, trial, reference, tally)
    label = trial.phase
    if kind.startswith("interrupt"):
        label = f"Ctrl-C during {trial.phase}"
        ok = trial.returncode == 130 and helpers.interrupted_summary(trial.output) is not None
        report.rows[label].clean_exits += int(ok)
    row = report.rows[label]
    row.trials += 1
    row.committed += len(trial.reported)
    row.lost += len(tally.lost) - before_lost
    row.altered += len(tally.altered) - before_altered
    if tally.other:
        report.notes.extend(tally.other)
        tally.other.clear()


def files_chains(helpers, args, tmp: Path, report: Report) -> None:
    """Step 1 of the module docstring."""
    zoo = helpers.write_files_zoo(tmp / "zoo", args.models)
    reference_path = tmp / "reference.h5"
    argv = helpers.scan_argv("files", [str(zoo)], reference_path, helpers.FILES_DATASET)
    done = helpers.run_to_end(argv, helpers.scan_env("files"))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = helpers.contents(reference_path)
    rng = random.Random(args.seed)
    for chain in range(args.chains):
        store = tmp / f"chain-{chain}" / "zoo.h5"
        store.parent.mkdir()
        tally = helpers.Tally()
        for i, kind in enumerate(FILE_CHAIN):
            log = store.parent / f"trial-{i}.log"
            trial = helpers.files_trial(kind, store, zoo, log, rng)
            if not trial.killed:
                report.notes.append(f"files chain {chain}: trial {i} ({kind}) ended first")
                continue
            _check_chain_trial(helpers, kind, store, "files", trial, reference, tally, report)
            print(
                f"  files chain {chain} trial {i}: {kind} -> {trial.phase}, "
                f"{len(trial.reported)} reported",
                flush=True,
            )
        argv = helpers.scan_argv("files", [str(zoo)], store, helpers.FILES_DATASET)
        final = helpers.run_to_end(argv, helpers.scan_env("files"))
        equal = final.returncode == 0 and helpers.contents(store) == reference
        report.chains.append((f"files chain {chain}", equal, len(reference.models)))


def hub_chain(helpers, args, tmp: Path, report: Report) -> None:
    """Step 2 of the module docstring."""
    from hub_server import HubServer

    repos = helpers.write_hub_zoo(tmp / "hub", args.models)
    names = sorted(repos)
    with HubServer(latency=0.03) as hub:
        for repo, files in repos.items():
            hub.add_repo(repo, files)
        reference_path = tmp / "hub-reference.h5"
        argv = helpers.scan_argv("hf", names, reference_path, helpers.HUB_DATASET)
        done = helpers.run_to_end(argv, helpers.hub_env(hub, tmp / "hf-reference"))
        assert done.returncode == 0, done.stderr[-3000:]
        reference = helpers.contents(reference_path)
        store = tmp / "hub-chain" / "zoo.h5"
        store.parent.mkdir()
        rng = random.Random(args.seed + 1)
        tally = helpers.Tally()
        for i in range(args.hub_trials):
            log = store.parent / f"trial-{i}.log"
            trial = helpers.hub_trial(store, hub, names, tmp / "hf", log, rng)
            if not trial.killed:
                report.notes.append(f"hub chain: trial {i} ended first")
                continue
            _check_chain_trial(helpers, "kill", store, "hf", trial, reference, tally, report)
            print(
                f"  hub chain trial {i}: {trial.phase}, {len(trial.reported)} reported", flush=True
            )
        argv = helpers.scan_argv("hf", names, store, helpers.HUB_DATASET)
        final = helpers.run_to_end(argv, helpers.hub_env(hub, tmp / "hf"))
    equal = final.returncode == 0 and helpers.contents(store) == reference
    report.chains.append(("hub chain", equal, len(reference.models)))


def full_disks(helpers, tmp: Path, report: Report) -> None:
    """Step 3 of the module docstring."""
    zoo = helpers.write_mixed_zoo(tmp / "mixed", N_SMALL, N_LARGE)
    reference_path = tmp / "mixed-reference.h5"
    argv = helpers.scan_argv("files", [str(zoo)], reference_path, helpers.MIXED_DATASET)
    assert helpers.run_to_end(argv, helpers.scan_env("files")).returncode == 0
    reference = helpers.contents(reference_path)

    store = tmp / "rlimit" / "zoo.h5"
    store.parent.mkdir()
    _full_disk_run(
        helpers,
        "full disk: RLIMIT_FSIZE",
        zoo,
        store,
        reference,
        report,
        preexec_fn=helpers.file_size_limit(FSIZE_LIMIT),
    )
    mount = tmp / "tmpfs"
    mount.mkdir()
    why_not = helpers.mount_tmpfs(mount, "6m")
    if why_not:
        report.notes.append(f"full disk on a tmpfs skipped: {why_not}")
        return
    try:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(mount).free - 400_000))
        _full_disk_run(
            helpers,
            "full disk: 6 MB tmpfs",
            zoo,
            mount / "zoo.h5",
            reference,
            report,
            free=filler.unlink,
        )
    finally:
        helpers.unmount(mount)


def _full_disk_run(helpers, label, zoo, store, reference, report, *, free=None, **popen) -> None:
    env = helpers.scan_env("files", PYTHONDONTWRITEBYTECODE="1")
    argv = helpers.scan_argv("files", [str(zoo)], store, helpers.MIXED_DATASET)
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, **popen)
    errors = [line for line in first.stderr.splitlines() if line.startswith("Error:")]
    stored = helpers.reported(first.stdout)
    got = helpers.contents(store)
    row = report.rows[label]
    row.trials += 1
    row.committed += len(stored)
    row.clean_exits += int(first.returncode == 1 and len(errors) == 1)
    for name in stored:
        key = ("files", name)
        row.lost += key not in got.models
        row.altered += key in got.models and got.models[key] != reference.models[key]
    if errors:
        report.notes.append(f"{label}: {errors[0][:220]}")
    if free is not None:
        free()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    equal = again.returncode == 0 and helpers.contents(store) == reference
    report.chains.append((f"{label}, then space back", equal, len(reference.models)))


def print_report(report: Report, seconds: float) -> None:
    """The tables."""
    header = (
        f"{'stop':<30} {'trials':>6} {'committed':>9} {'lost':>5} {'altered':>7} {'clean exit':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    total = Row()
    for label, row in sorted(report.rows.items()):
        clean = (
            f"{row.clean_exits}/{row.trials}"
            if not label.startswith(("basis", "commit", "compaction", "fetch"))
            else "-"
        )
        print(
            f"{label:<30} {row.trials:>6} {row.committed:>9} {row.lost:>5} {row.altered:>7} "
            f"{clean:>10}"
        )
        for name in ("trials", "committed", "lost", "altered"):
            setattr(total, name, getattr(total, name) + getattr(row, name))
    print("-" * len(header))
    print(
        f"{'total':<30} {total.trials:>6} {total.committed:>9} {total.lost:>5} {total.altered:>7}"
    )
    kills = sum(r.trials for k, r in report.rows.items() if not k.startswith(("Ctrl", "full")))
    print(
        f"\nSIGKILL trials: {kills}; 'committed' counts the models the killed runs "
        "reported as stored; each was checked bit for bit after every later stop too."
    )
    print("\nfinal stores (after one more run to the end):")
    for chain, equal, models in report.chains:
        verdict = (
            "equals the uninterrupted scan" if equal else "DIFFERS from the uninterrupted scan"
        )
        print(f"  {chain:<45} {models:>4} models, {verdict}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"\n{seconds / 60:.1f} minutes")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=200, help="models per scan (default 200)")
    p.add_argument("--chains", type=int, default=5, help="files chains (10 stops each)")
    p.add_argument("--hub-trials", type=int, default=16, help="SIGKILLs of hub scans")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every trial, print the tables; exit status 1 if anything was lost."""
    args = parse_args(argv)
    import crash_helpers as helpers

    report = Report()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zooscan-crash-") as name:
        tmp = Path(name)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            os.environ.pop(key, None)
        print(f"files chains: {args.chains} x {len(FILE_CHAIN)} stops, {args.models} models")
        files_chains(helpers, args, tmp, report)
        print(f"hub chain: {args.hub_trials} SIGKILLs, {args.models} models")
        hub_chain(helpers, args, tmp, report)
        print("full disks")
        full_disks(helpers, tmp, report)
    print_report(report, time.monotonic() - started)
    bad = any(r.lost or r.altered for r in report.rows.values())
    return 1 if bad or not all(equal for _, equal, _ in report.chains) else 0


if __name__ == "__main__":
    sys.exit(main())
