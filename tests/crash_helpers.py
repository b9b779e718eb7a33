"""Shared parts of the crash, full-disk, Ctrl-C and concurrency tests and of
``benchmarks/report_crash.py``: real model zoos on disk (safetensors files written by
the ``safetensors`` library, or tiny transformers ViT repositories for the loopback
hub), the real ``zooscan scan`` command run as a subprocess, killed at chosen moments,
and a bit-for-bit comparison of stores.

Tests import it by module name (pytest puts ``tests/`` on ``sys.path``); the report
script adds ``tests/`` to ``sys.path`` itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from zooscan.store import Store

FILE_SHAPES = ((16, 3, 3, 3), (8, 3, 5, 5))
"""Weight shapes of the ``files`` zoo, in turn (two kernel shapes: two bases)."""
FILES_DATASET = "synthetic:n=300,size=64"
"""Patch dataset of the ``files`` scans: large enough that a basis takes a while."""
HUB_DATASET = "synthetic:n=40,size=48"
"""Patch dataset of the hub scans (their one 3x4x4 basis is quick)."""
HUB_SHAPE = (32, 3, 4, 4)
HUB_KEY = "embeddings.patch_embeddings.projection.weight"
IGNORED_ATTRS = frozenset({"scanned_at", "created_at", "bytes_fetched"})
"""What may differ between two scans of the same models: timestamps, and the bytes a
fetch read (a retried request reads more)."""
IGNORED_METADATA = frozenset({"requests"})
"""The ``hf`` source's request count per model (retries and caches change it)."""
_STORED = re.compile(r"^stored (\S.*)$", re.MULTILINE)


# ----------------------------------------------------------------------------- zoos


def file_weight(i: int) -> np.ndarray:
    """The first-layer weight of file model ``i`` (deterministic)."""
    shape = FILE_SHAPES[i % len(FILE_SHAPES)]
    return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


def file_name(i: int) -> str:
    return f"m{i:03d}"


def write_files_zoo(root: Path, n: int) -> Path:
    """``n`` safetensors checkpoints ``m000.safetensors``... under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        weight = file_weight(i)
        tensors = {"stem.weight": weight, "stem.bias": np.zeros(weight.shape[0], np.float32)}
        save_file(tensors, str(root / f"{file_name(i)}.safetensors"))
    return root


def hub_weight(i: int) -> np.ndarray:
    """The patch-embedding weight of hub model ``i`` (deterministic)."""
    return np.random.default_rng(10_000 + i).standard_normal(HUB_SHAPE).astype(np.float32)


def hub_name(i: int) -> str:
    return f"zoo/vit-{i:03d}"


def write_hub_zoo(root: Path, n: int) -> dict[str, dict[str, Path]]:
    """``n`` tiny ViT repositories as transformers lays them out (``config.json``,
    ``preprocessor_config.json``, ``model.safetensors`` holding the patch embedding);
    returns ``{repo id: {file name: path}}`` for :meth:`HubServer.add_repo`."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "vit",
        "architectures": ["ViTModel"],
        "hidden_size": HUB_SHAPE[0],
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "image_size": 32,
        "patch_size": HUB_SHAPE[2],
        "num_channels": HUB_SHAPE[1],
    }
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "preprocessor_config.json").write_text(json.dumps(processor))
    repos = {}
    for i in range(n):
        path = root / f"vit-{i:03d}.safetensors"
        bias = np.zeros(HUB_SHAPE[0], np.float32)
        save_file({HUB_KEY: hub_weight(i), HUB_KEY.replace("weight", "bias"): bias}, str(path))
        repos[hub_name(i)] = {
            "config.json": root / "config.json",
            "preprocessor_config.json": root / "preprocessor_config.json",
            "model.safetensors": path,
        }
    return repos


# ----------------------------------------------------------------------------- scans


def scan_argv(source: str, patterns: Sequence[str], store: Path, dataset: str) -> list[str]:
    """``python -m zooscan scan`` with one line per committed model (``-v``)."""
    return [
        sys.executable,
        "-m",
        "zooscan",
        "scan",
        "--source",
        source,
        *patterns,
        "--store",
        str(store),
        "--dataset",
        dataset,
        "--workers",
        "4",
        "--verbose",
    ]


def scan_env(source: str, **extra: str) -> dict[str, str]:
    """The environment of a scan subprocess: only the plugins it needs (a faster
    start), unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", ZOOSCAN_LOAD_PLUGINS=f"{source},image_datasets")
    env.update(extra)
    return env


def reported(output: str) -> list[str]:
    """The models a ``scan -v`` printed as stored (it prints after each commit)."""
    return _STORED.findall(output)


@dataclass
class Trial:
    """One scan process, killed (or not) at a chosen moment."""

    phase: str
    """Where the kill landed: ``basis``, ``fetch``, ``commit``, ``compaction``, or
    ``finished`` when the scan ended before the kill."""
    reported: list[str]
    killed: bool
    returncode: int
    output: str
    seconds: float
    stop_seconds: float = 0.0
    """From the signal to the process's exit."""


def run_and_kill(
    argv: Sequence[str],
    env: dict[str, str],
    log: Path,
    *,
    ready: Callable[[str], bool],
    delay: float,
    phase_of: Callable[[str], str],
    sig: int = signal.SIGKILL,
    timeout: float = 300.0,
) -> Trial:
    """Start ``argv``, wait until ``ready(output so far)``, sleep ``delay`` seconds,
    send ``sig``; ``phase_of(output)`` (called right after the signal, before anything
    else touches the store) names where it landed."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while proc.poll() is None and not ready(log.read_text()):
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"scan not ready after {timeout} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.005)
        if delay and proc.poll() is None:
            time.sleep(delay)
        killed = proc.poll() is None
        signalled = time.monotonic()
        if killed:
            proc.send_signal(sig)
            phase = phase_of(log.read_text())
        proc.wait(timeout=timeout)
        stop_seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    return Trial(
        phase=phase if killed else "finished",
        reported=reported(output),
        killed=killed,
        returncode=proc.returncode,
        output=output,
        seconds=time.monotonic() - started,
        stop_seconds=stop_seconds if killed else 0.0,
    )


def run_to_end(argv: Sequence[str], env: dict[str, str], timeout: float = 600.0):
    """Run a scan to its end; the completed process."""
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def temporaries(store: Path) -> list[Path]:
    """The ``<store>.tmp-*`` files (a compaction in progress, or killed)."""
    return sorted(store.parent.glob(store.name + ".tmp-*"))


def basis_in_progress(output: str) -> str | None:
    """The shape (``3x5x5``) of the basis the scan announced last, when no model was
    reported after the announcement (so it may still be computing it)."""
    last = None
    for line in output.splitlines():
        if line.startswith("computing basis "):
            last = line.split()[2]
        elif line.startswith("stored "):
            last = None
    return last


# ----------------------------------------------------------------------------- stores


@dataclass
class Contents:
    """A store's contents without timestamps (and fetch counters), comparable with ==."""

    models: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)


def _layer_fields(layer: Any) -> dict[str, Any]:
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
    fields.pop("weight")
    prov = dataclasses.asdict(fields.pop("provenance"))
    fields["provenance"] = {k: v for k, v in prov.items() if k not in IGNORED_ATTRS}
    fields["metadata"] = {k: v for k, v in fields["metadata"].items() if k not in IGNORED_METADATA}
    return fields


def model_contents(store: Store, key: tuple[str, str]) -> dict[str, Any]:
    """One model as bytes and plain values."""
    m = store.load_model(*key)
    return {
        "weight": (m.layer.weight.dtype.str, m.layer.weight.shape, m.layer.weight.tobytes()),
        "layer": _layer_fields(m.layer),
        "energy": {b: e.tobytes() for b, e in m.energy.items()},
        "projections": {b: p.tobytes() for b, p in m.projections.items()},
    }


def contents(path: Path) -> Contents:
    """Everything ``path`` holds (journal included), ready to compare."""
    out = Contents()
    with Store(path) as store:
        for key in store.models():
            out.models[key] = model_contents(store, key)
        for bid in store.bases():
            basis = store.get_basis(bid)
            info = {k: v for k, v in store.basis_info(bid).items() if k not in IGNORED_ATTRS}
            arrays = ("components", "eigenvalues", "mean", "second_moment")
            out.bases[bid] = {"info": info, **{a: getattr(basis, a).tobytes() for a in arrays}}
        for f in store.failures():
            out.failures[(f["source"], f["name"])] = (f["error_class"], f["message"])
    return out


def differences(got: Contents, expected: Contents, names: Sequence[tuple[str, str]]) -> list[str]:
    """How the models ``names`` (and every basis ``got`` holds) differ from ``expected``."""
    found = []
    for key in names:
        if key not in got.models:
            found.append(f"{key} lost")
        elif key not in expected.models:
            found.append(f"{key} is not in the reference store")
        elif got.models[key] != expected.models[key]:
            parts = [k for k in got.models[key] if got.models[key][k] != expected.models[key][k]]
            found.append(f"{key} altered: {parts}")
    for bid, basis in got.bases.items():
        if expected.bases.get(bid) != basis:
            found.append(f"basis {bid} differs from the reference")
    return found


def random_delay(rng: random.Random, low: float, high: float) -> float:
    """A uniform delay (seconds), rounded to the millisecond for readable logs."""
    return round(rng.uniform(low, high), 3)


# ----------------------------------------------------------------------------- trials


def _has_basis(store: Path, shape: str) -> bool:
    try:
        with Store(store) as s:
            return any(bid.split("~")[1] == shape for bid in s.bases())
    except Exception:  # noqa: BLE001 - no store (yet) means no basis
        return False


def files_phase(store: Path) -> Callable[[str], str]:
    """Where a kill of a ``files`` scan landed: ``compaction`` (a new main file was
    being written), ``basis`` (the announced basis is not stored), else ``commit``."""

    def phase_of(output: str) -> str:
        if temporaries(store):
            return "compaction"
        shape = basis_in_progress(output)
        if shape is not None and not _has_basis(store, shape):
            return "basis"
        return "commit"

    return phase_of


def files_trial(kind: str, store: Path, zoo: Path, log: Path, rng: random.Random) -> Trial:
    """One ``files`` scan of ``zoo`` into ``store``, stopped in phase ``kind`` by
    SIGKILL: ``basis`` (while a basis is computed), ``commit`` (after a random number
    of new commits plus a short random delay) or ``compaction`` (as soon as a
    compaction starts writing the new main file); or by SIGINT (Ctrl-C):
    ``interrupt-basis`` and ``interrupt`` (as ``basis`` and ``commit``)."""
    sig = signal.SIGINT if kind.startswith("interrupt") else signal.SIGKILL
    kind = {"interrupt-basis": "basis", "interrupt": "commit"}.get(kind, kind)
    if kind == "basis":

        def ready(out: str) -> bool:
            return basis_in_progress(out) is not None

        delay = random_delay(rng, 0.0, 0.6)
    elif kind == "commit":
        target = rng.randint(1, 30)

        def ready(out: str) -> bool:
            return len(reported(out)) >= target

        delay = random_delay(rng, 0.0, 0.05)
    elif kind == "compaction":

        def ready(out: str) -> bool:
            return bool(temporaries(store))

        delay = random_delay(rng, 0.0, 0.01)
    else:
        raise ValueError(f"unknown kind of files trial {kind!r}")
    argv = scan_argv("files", [str(zoo)], store, FILES_DATASET)
    return run_and_kill(
        argv,
        scan_env("files"),
        log,
        ready=ready,
        delay=delay,
        phase_of=files_phase(store),
        sig=sig,
    )


def interrupted_summary(output: str) -> int | None:
    """The ``stored N`` of the ``interrupted:`` summary line a Ctrl-C'd scan prints."""
    found = re.search(r"^interrupted: stored (\d+),", output, re.MULTILINE)
    return int(found.group(1)) if found else None


def hub_env(hub: Any, home: Path) -> dict[str, str]:
    """A scan's environment for the loopback ``hub``: its endpoint, an empty cache in
    ``home``, no token, online."""
    env = scan_env("hf", HF_ENDPOINT=hub.endpoint, HF_HOME=str(home))
    env["HF_HUB_CACHE"] = str(home / "hub")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return env


def hub_trial(
    store: Path,
    hub: Any,
    names: Sequence[str],
    home: Path,
    log: Path,
    rng: random.Random,
    *,
    mid_fetch: bool = False,
) -> Trial:
    """One ``hf`` scan of ``names`` from the (slow) loopback ``hub``, SIGKILLed after a
    random number of new commits plus a random delay (``mid_fetch``: no delay, but only
    while the hub is answering a request); the phase is ``fetch`` when the hub was
    answering a request at that moment."""
    target = rng.randint(1, 8)

    def ready(out: str) -> bool:
        return len(reported(out)) >= target and (not mid_fetch or hub._in_flight > 0)

    def phase_of(output: str) -> str:
        if hub._in_flight:
            return "fetch"
        return files_phase(store)(output)

    argv = scan_argv("hf", list(names), store, HUB_DATASET)
    return run_and_kill(
        argv,
        hub_env(hub, home),
        log,
        ready=ready,
        delay=0.0 if mid_fetch else random_delay(rng, 0.0, 0.4),
        phase_of=phase_of,
    )


@dataclass
class Tally:
    """Trials run and what they showed (for assertions and the report)."""

    trials: list[Trial] = field(default_factory=list)
    committed: set[str] = field(default_factory=set)
    """Every model some trial reported as stored."""
    lost: set[str] = field(default_factory=set)
    altered: set[str] = field(default_factory=set)
    other: list[str] = field(default_factory=list)
    """Other differences (a basis differing from the reference)."""

    def by_phase(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.phase] = counts.get(trial.phase, 0) + 1
        return counts


def check_after_kill(
    store: Path, source: str, trial: Trial, reference: Contents, tally: Tally
) -> None:
    """Record ``trial`` in ``tally`` and check the store it left: it opens, and every
    model reported so far is there, bit-identical to ``reference``."""
    tally.trials.append(trial)
    tally.committed.update(trial.reported)
    if not store.exists() and not tally.committed:
        return
    got = contents(store)  # raises if the store does not open
    for line in differences(got, reference, [(source, n) for n in sorted(tally.committed)]):
        if line.endswith(" lost"):
            tally.lost.add(line)
        elif " altered" in line:
            tally.altered.add(line)
        else:
            tally.other.append(line)


# ----------------------------------------------------------------------------- full disk

MIXED_SHAPES = ((16, 3, 3, 3), (256, 3, 5, 5))
"""Small models (journal entries of ~5 kB), then large ones (~230 kB)."""
MIXED_DATASET = "synthetic:n=20,size=32"


def mixed_weight(i: int, n_small: int) -> np.ndarray:
    """Model ``i`` of a zoo of ``n_small`` small models followed by large ones."""
    shape = MIXED_SHAPES[0] if i < n_small else MIXED_SHAPES[1]
    return np.random.default_rng(500 + i).standard_normal(shape).astype(np.float32)


def write_mixed_zoo(root: Path, n_small: int, n_large: int) -> Path:
    """``n_small`` small then ``n_large`` large checkpoints ``m000.safetensors``..."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_small + n_large):
        weight = mixed_weight(i, n_small)
        save_file({"conv.weight": weight}, str(root / f"{file_name(i)}.safetensors"))
    return root


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` limiting every file the child writes to ``limit`` bytes, with
    SIGXFSZ ignored: writes past it fail with EFBIG, as on a full disk."""

    def apply() -> None:  # runs in the child, between fork and exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def mount_tmpfs(mount: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` (``"6m"``) on ``mount``; ``None`` when done, else why
    it cannot be (not root, no ``mount``, not permitted)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"zooscan-{os.getpid()}", str(mount)],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()}"


def unmount(mount: Path) -> None:
    """Unmount what :func:`mount_tmpfs` mounted."""
    subprocess.run(["umount", "-l", str(mount)], check=False)


# ----------------------------------------------------------------------------- network faults

NETWORK_FAULTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "429 + Retry-After": [("status", {"status": 429, "retry_after": 0.5})],
    "5xx": [("status", {"status": code}) for code in (500, 502, 503)],
    "reset mid-body": [("reset", {"after_bytes": 100})],
    "truncated body": [("truncate", {"after_bytes": 100})],
    "wrong Content-Length": [
        ("wrong_length", {"length_delta": 300}),
        ("wrong_length", {"length_delta": -300}),
    ],
    "slow server": [("delay", {"delay": 0.4})],
}
"""Faults by kind, as :meth:`HubServer.inject` programs them (``tests/hub_server.py``)."""


def inject(hub: Any, kind: str, probability: float, count: int | None = None) -> None:
    """Program the faults of ``kind`` (:data:`NETWORK_FAULTS`) on every request path."""
    for fault, params in NETWORK_FAULTS[kind]:
        hub.inject(fault, path="*", count=count, probability=probability, **params)


def faults_served(hub: Any) -> dict[str, int]:
    """Faulty answers the hub gave, by kind (``HTTP 503``, ``reset``, ``delay``...)."""
    counts: dict[str, int] = {}
    for request in hub.requests():
        if request.fault:
            label = f"HTTP {request.status}" if request.fault == "status" else request.fault
            counts[label] = counts.get(label, 0) + 1
    return counts


def scan_in_process(
    store: Path,
    names: Sequence[str],
    *,
    retry_failed: bool = False,
    on_model: Callable[[Any, str], None] | None = None,
) -> tuple[Any, int]:
    """Scan ``names`` with the ``hf`` source from ``$HF_ENDPOINT`` through the scan
    engine the CLI uses; the summary and the retries its hub client made."""
    from zooscan import plugins
    from zooscan.scan import plan_scan, run_scan

    source = plugins.get_source("hf", {})
    dataset = plugins.open_dataset(HUB_DATASET)
    with Store(store, mode="a") as writer:
        plan = plan_scan(writer, source, list(names), retry_failed=retry_failed)
        summary = run_scan(writer, source, plan, dataset, workers=4, on_model=on_model)
    return summary, source.client.retries


def wrong_hub_tensors(store: Path) -> tuple[int, list[str]]:
    """How many hub models ``store`` holds, and those whose weight, tensor key or
    recorded sha256 is not the true tensor's (the sha256 of its float32 bytes)."""
    import hashlib

    wrong = []
    with Store(store) as reader:
        names = [name for _, name in reader.models("hf")]
        for name in names:
            expected = hub_weight(int(name.rsplit("-", 1)[1]))
            layer = reader.load_model("hf", name).layer
            prov = layer.provenance
            if (
                layer.weight.tobytes() != expected.tobytes()
                or prov.tensor_key != HUB_KEY
                or prov.sha256 != hashlib.sha256(expected.tobytes()).hexdigest()
            ):
                wrong.append(name)
    return len(names), wrong
