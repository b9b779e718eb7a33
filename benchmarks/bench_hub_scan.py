"""A 200-model ``timm`` scan from the loopback hub: models per second, resume time, and
the paper's download-everything baseline measured in the same run.

What it does, in order:

1. **Pick the models.** Tags of ``timm.list_models(pretrained=True)`` whose weights are
   a ``model.safetensors`` in a hub repository (timm's default), taken round-robin over
   architecture families (``resnet``, ``vit``, ``convnext``...; distinct architectures
   first) so that the sample is a mix. Each tag is identified on the ``meta`` device
   exactly as the scan will (:func:`zooscan_builtins.timm_source.identify`); tags whose
   first layer cannot be found, whose kernel is larger than 16x16 or 768 patch
   dimensions (a costly basis on the small synthetic dataset), or whose checkpoint
   filter would need the full state dict are skipped, as are the very largest
   architectures (names with ``huge``, ``giant``...: slow to build, nothing different
   to fetch).
2. **Host real checkpoints.** For each hub repository, ``safetensors.torch.save_file``
   writes a ``model.safetensors`` holding the first-layer tensors the source asks for
   (the meta model's parameter names and shapes, random values) plus one filler tensor
   (``--filler-mb``, default 8 MB) named after the model's last real weight, so that a
   full download costs something. Tags sharing a repository share its file (key union).
   :class:`hub_server.HubServer` (``tests/hub_server.py``) serves them on 127.0.0.1
   with its CDN redirect and Range support.
3. **Bases first.** The patch bases of every kernel shape in the sample are computed
   (timed, reported) and put into the scan's store, so the scan's own time is fetching,
   identification, analysis and commits only (the scan then reports no basis computed).
4. **The scan**, as a user runs it, in a subprocess::

       python -m zooscan scan --source timm TAG... --workers 8 --store zoo.h5 \\
           --dataset synthetic:n=100,size=48 --format json

   with ``HF_ENDPOINT`` at the loopback hub and ``HF_HOME``/``HF_HUB_CACHE``/
   ``TORCH_HOME`` in a temporary directory (nothing touches ``~/.cache``). Wall time
   (process start to exit), the engine's own seconds, models/s, stored/failed, the
   bytes and requests the server logged.
5. **Resume**: the same command again (every model already stored): wall time,
   requests, stored/skipped.
6. **Baseline** (the paper's way to get first layers): download each whole
   ``model.safetensors`` (:meth:`zooscan.remote.HubClient.read_all`, resolve included)
   and read the tensor from it (``safetensors.torch.load``), for ``--baseline-seq``
   models sequentially and for all models with ``--workers`` threads; the same models
   fetched our way (:func:`zooscan.remote.fetch_tensors`: header + one ranged read)
   with the same client settings, for a like-for-like ratio of time and bytes.
7. **Emulated link** (``--emulate-models``, default 24; 0 skips): the server paces each
   response and delays each request (``--mbps`` 100, ``--rtt-ms`` 30); parallel
   requests each get ``mbps / workers`` (a fair share of one link). The CLI scan of
   that subset (fresh store, bases pre-seeded) and the two fetch strategies again.

The loopback server runs in this process (threads) and the scan in its own process; on
loopback, transfer costs nothing and times measure CPU work, which is what the
emulated link is for. Everything lives in a temporary directory removed at the end
(``--filler-mb`` x models of disk while it runs).

Run: ``.venv/bin/python benchmarks/bench_hub_scan.py [--models 200] [--workers 8]``
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DATASET = "synthetic:n=100,size=48"
WEIGHTS_FILE = "model.safetensors"
MAX_KERNEL = 16
MAX_PATCH_DIM = 768
SKIP_WORDS = ("huge", "giant", "gigantic", "xxlarge", "_g14", "qwen", "deepseek", "sam2", "test_")
"""Tag substrings skipped: the very largest architectures (slow to build on meta, nothing
different to fetch) and timm's tiny test models."""
HF_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


# ----------------------------------------------------------------------- environment


def isolate_environment(tmp: Path) -> dict[str, str]:
    """Point every cache at ``tmp`` and drop the user's hub settings (before any hub
    library is imported); returns the directories made."""
    dirs = {
        "HF_HOME": tmp / "hf_home",
        "HF_HUB_CACHE": tmp / "hf_home" / "hub",
        "TORCH_HOME": tmp / "torch_home",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    for name in HF_VARIABLES:
        os.environ.pop(name, None)
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return {k: str(v) for k, v in dirs.items()}


# ------------------------------------------------------------------------ the models


@dataclass
class Candidate:
    """One selected tag: where its weights live and what the source will ask for."""

    tag: str
    repo: str
    tensors: dict[str, tuple[int, ...]]
    """First-layer parameter name -> shape (meta model)."""
    kernel: tuple[int, int, int]
    """``(C, kh, kw)`` of the pixel-space kernel: the basis the scan needs."""
    filler_key: str
    checkpoint_bytes: int
    dtypes: dict[str, Any] = field(default_factory=dict)
    """First-layer parameter name -> torch dtype (meta model; float32 when absent)."""
    """Size of the real checkpoint (the meta state dict at its dtypes)."""

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the first-layer tensors (float32), what a scan must fetch at least."""
        return sum(
            math.prod(shape) * _itemsize(self.dtypes.get(key))
            for key, shape in self.tensors.items()
        )


@dataclass
class Selection:
    """The chosen tags and why others were passed over."""

    chosen: list[Candidate] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0


def family(architecture: str) -> str:
    """A tag's model family: the architecture's first word without trailing digits."""
    head = architecture.split("_")[0]
    return head.rstrip("0123456789") or head


def ordered_candidates(n: int) -> list[str]:
    """Eligible tags in the order they are tried: a systematic sample first (every
    ``k``-th of the sorted tags, ``k = eligible // n``, so families appear in proportion
    to their size), then the tags between them as replacements for skipped ones."""
    import timm

    from zooscan_builtins import timm_source as ts

    eligible = []
    for tag in sorted(timm.list_models(pretrained=True)):
        if any(word in tag for word in SKIP_WORDS):
            continue
        cfg = ts.pretrained_cfg(tag)
        try:
            location = ts.weight_location(cfg)
        except Exception:  # noqa: BLE001 - a tag without weights is simply not eligible
            continue
        hub_id = str(cfg.get("hf_hub_id") or "")
        if location.kind != "hub" or location.custom_format or "@" in hub_id:
            continue
        if location.filenames[:1] == (WEIGHTS_FILE,):
            eligible.append(tag)
    stride = max(1, len(eligible) // max(1, n))
    return [t for _, t in sorted(enumerate(eligible), key=lambda it: (it[0] % stride, it[0]))]


def select(n: int, filler_mb: float) -> Selection:
    """Identify candidates in order until ``n`` are usable (see the module docstring)."""
    from zooscan_builtins import timm_source as ts

    selection = Selection()
    started = time.perf_counter()
    shapes_by_repo: dict[str, dict[str, tuple[int, ...]]] = {}
    for tag in ordered_candidates(n):
        if len(selection.chosen) >= n:
            break
        reason, cand = _examine(ts, tag, filler_mb)
        if cand is not None and _conflicts(cand, shapes_by_repo.get(cand.repo, {})):
            reason, cand = "shares a repository with different shapes", None
        if cand is None:
            selection.skipped[reason] += 1
            continue
        shapes_by_repo.setdefault(cand.repo, {}).update(cand.tensors)
        selection.chosen.append(cand)
    selection.seconds = time.perf_counter() - started
    return selection


def _conflicts(cand: Candidate, existing: dict[str, tuple[int, ...]]) -> bool:
    return any(k in existing and existing[k] != s for k, s in cand.tensors.items())


def _examine(ts: Any, tag: str, filler_mb: float) -> tuple[str, Candidate | None]:
    """``(reason, None)`` to skip ``tag``, else ``("", candidate)``."""
    import numpy as np

    try:
        ident = ts.identify(tag)
    except Exception as exc:  # noqa: BLE001 - identification failures are only counted here
        return f"not identified ({type(exc).__name__})", None
    shapes = ident.parameter_shapes()
    kernel, _ = ident.spec.materialize({k: np.ones(s, dtype=np.float32) for k, s in shapes.items()})
    c, kh, kw = (int(v) for v in kernel.shape[1:])
    if max(kh, kw) > MAX_KERNEL or c * kh * kw > MAX_PATCH_DIM:
        return f"kernel larger than {MAX_KERNEL}x{MAX_KERNEL} or {MAX_PATCH_DIM} dims", None
    state = ident.model.state_dict()
    filler = _filler_key(state, shapes)
    numel = max(1, int(filler_mb * 2**20 / 4))
    try:
        mapping = ts.map_checkpoint_keys(ident, file_index(state, shapes, filler, numel))
    except Exception:  # noqa: BLE001 - the filter needs a complete state dict
        return "timm's checkpoint filter needs the full state dict", None
    if any(mapping[k] != k for k in shapes):
        return "timm's checkpoint filter remaps the partial file", None
    repo = ident.cfg["hf_hub_id"]
    size = sum(t.numel() * t.element_size() for t in state.values())
    dtypes = {k: state[k].dtype for k in shapes}
    return "", Candidate(tag, repo, shapes, (c, kh, kw), filler, size, dtypes)


def _itemsize(dtype: Any) -> int:
    return 4 if dtype is None else int(dtype.itemsize)


def file_index(
    state: dict[str, Any], shapes: dict[str, tuple[int, ...]], filler: str, numel: int
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The index the source will read from the file's header, in header order:
    ``save_file`` lays tensors out by dtype alignment (largest first), then name. Some
    checkpoint filters depend on that order (NextViT's remaps by position when a
    timm-format sentinel key is missing), so the check must see the same order."""
    entries = {k: (tuple(s), state[k].dtype) for k, s in shapes.items()}
    entries[filler] = ((numel,), None)
    order = sorted(entries, key=lambda k: (-_itemsize(entries[k][1]), k))
    return {k: (entries[k][0], _dtype_name(entries[k][1])) for k in order}


def _dtype_name(dtype: Any) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def _filler_key(state: dict[str, Any], first: dict[str, Any]) -> str:
    """The model's last floating-point weight outside the first layer (a real name)."""
    for key in reversed(list(state)):
        if key not in first and key.endswith("weight") and state[key].is_floating_point():
            return key
    return "head.weight"


# --------------------------------------------------------------------- the hub files


def write_checkpoints(chosen: Sequence[Candidate], root: Path, filler_mb: float) -> dict[str, Path]:
    """One real ``model.safetensors`` per hub repository; returns repo -> path."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    numel = max(1, int(filler_mb * 2**20 / 4))
    filler = torch.randn(numel, generator=generator)
    by_repo: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for cand in chosen:
        tensors = by_repo[cand.repo]
        for key, shape in cand.tensors.items():
            if key not in tensors:
                tensors[key] = random_tensor(key, shape, cand.dtypes.get(key), generator)
        if not any(t is filler for t in tensors.values()):
            tensors[cand.filler_key] = filler
    paths = {}
    for i, (repo, tensors) in enumerate(by_repo.items()):
        path = root / f"{i:04d}" / WEIGHTS_FILE
        path.parent.mkdir(parents=True)
        save_file(tensors, str(path), metadata={"format": "pt"})
        paths[repo] = path
    return paths


def random_tensor(key: str, shape: tuple[int, ...], dtype: Any, generator: Any) -> Any:
    """Random values a real checkpoint could hold: normal weights, positive batch-norm
    variances (re-parameterised stems take their square root), zero counters."""
    import torch

    dtype = dtype or torch.float32
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if key.endswith("running_var"):
        return (torch.rand(shape, generator=generator) + 0.5).to(dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def host(server: Any, paths: dict[str, Path]) -> int:
    """Add the repositories to the server and hash their files now (not inside a timed
    request); returns the total bytes hosted."""
    repos = [
        server.add_repo(repo, {WEIGHTS_FILE: path}, library_name="timm", tags=["timm"])
        for repo, path in paths.items()
    ]
    files = [f for r in repos for f in r.files.values()]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda f: f.sha256, files))
    return sum(f.size for f in files)


# --------------------------------------------------------------------------- bases


def compute_bases(kernels: set[tuple[int, int, int]]) -> tuple[list[Any], dict[tuple, float]]:
    """The centred patch bases of ``kernels`` on :data:`DATASET`, with seconds per shape."""
    from zooscan import plugins
    from zooscan.patches import compute_basis

    dataset = plugins.open_dataset(DATASET)
    bases, seconds = [], {}
    for shape in sorted(kernels):
        start = time.perf_counter()
        bases.append(compute_basis(dataset, *shape, centered=True))
        seconds[shape] = time.perf_counter() - start
    return bases, seconds


def seed_store(path: Path, bases: Sequence[Any]) -> None:
    """A new store holding ``bases`` (so the scan computes none)."""
    from zooscan.store import Store

    with Store(path, mode="a") as store:
        for basis in bases:
            store.put_basis(basis)


# ---------------------------------------------------------------------------- scans


@dataclass
class ScanRun:
    """One ``zooscan scan`` process."""

    wall: float
    returncode: int
    summary: dict[str, Any]
    requests: int
    sent: int
    stderr: str


def scan_command(tags: Sequence[str], store: Path, workers: int) -> list[str]:
    """The user's command line (``python -m zooscan`` of this interpreter)."""
    return [
        sys.executable, "-m", "zooscan", "scan", "--source", "timm", *tags,
        "--workers", str(workers), "--store", str(store), "--dataset", DATASET,
        "--format", "json",
    ]  # fmt: skip


def run_scan(server: Any, tags: Sequence[str], store: Path, workers: int) -> ScanRun:
    """Run the scan in a subprocess against ``server``; the server's log is reset first."""
    server.reset_log()
    env = dict(os.environ, HF_ENDPOINT=server.endpoint)
    start = time.perf_counter()
    proc = subprocess.run(
        scan_command(tags, store, workers),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    wall = time.perf_counter() - start
    server.settle()
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        summary = {}
    return ScanRun(
        wall, proc.returncode, summary, len(server.requests()), server.bytes_sent(), proc.stderr
    )


def startup_seconds(server: Any) -> float:
    """Wall time of ``python -m zooscan sources`` (interpreter, torch, plugins loaded):
    the fixed cost inside every scan's wall time."""
    env = dict(os.environ, HF_ENDPOINT=server.endpoint)
    command = [sys.executable, "-m", "zooscan", "sources", "--format", "json"]
    start = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, timeout=300, check=True)
    return time.perf_counter() - start


# ------------------------------------------------------------- fetch comparisons


@dataclass
class FetchRun:
    """Fetching the first layers of some models one way."""

    label: str
    models: int
    workers: int
    seconds: float
    sent: int
    requests: int


def ranged_fetch(client: Any, cand: Candidate) -> None:
    """zooscan's way: resolve, safetensors header, one ranged read of the tensors."""
    from zooscan.remote import fetch_tensors

    result = fetch_tensors(client, client.resolve(cand.repo, WEIGHTS_FILE), list(cand.tensors))
    for key, shape in cand.tensors.items():
        assert tuple(result.tensors[key].shape) == shape, (cand.tag, key)


def full_download(client: Any, cand: Candidate) -> None:
    """The baseline: download the whole checkpoint, then read the tensors from it."""
    from safetensors.torch import load

    state = load(client.read_all(client.resolve(cand.repo, WEIGHTS_FILE)))
    for key, shape in cand.tensors.items():
        assert tuple(state[key].shape) == shape, (cand.tag, key)


def timed_fetch(
    server: Any,
    label: str,
    how: Callable[[Any, Candidate], None],
    chosen: Sequence[Candidate],
    workers: int,
    cache_dir: str,
) -> FetchRun:
    """Fetch ``chosen`` with ``how`` on ``workers`` threads sharing one fresh client."""
    from zooscan.remote import HubClient

    server.reset_log()
    with HubClient(endpoint=server.endpoint, token=False, cache_dir=cache_dir) as client:
        start = time.perf_counter()
        if workers == 1:
            for cand in chosen:
                how(client, cand)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda c: how(client, c), chosen))
        seconds = time.perf_counter() - start
    server.settle()
    return FetchRun(
        label, len(chosen), workers, seconds, server.bytes_sent(), len(server.requests())
    )


def compare(
    server: Any, chosen: Sequence[Candidate], workers: int, seq: int, cache_dir: str
) -> list[tuple[FetchRun, FetchRun]]:
    """(ours, baseline) pairs: ``seq`` models sequentially, all with ``workers`` threads."""
    pairs = []
    plans = [(chosen[:seq], 1)] if seq else []
    plans.append((chosen, workers))
    for subset, threads in plans:
        ours = timed_fetch(server, "ranged", ranged_fetch, subset, threads, cache_dir)
        base = timed_fetch(server, "full download", full_download, subset, threads, cache_dir)
        pairs.append((ours, base))
    return pairs


# ---------------------------------------------------------------------------- report


def mb(n: float) -> str:
    """Bytes as MB (or KB below 1 MB)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def print_selection(sel: Selection, hosted: int, write_s: float, bases_s: dict) -> None:
    """What was prepared."""
    chosen = sel.chosen
    families = collections.Counter(family(c.tag.split(".", 1)[0]) for c in chosen)
    kernels = collections.Counter("x".join(map(str, c.kernel)) for c in chosen)
    print(f"models: {len(chosen)} timm tags from {len(families)} families, identified on meta in "
          f"{sel.seconds:.1f} s; skipped on the way: {dict(sel.skipped) or 'none'}")  # fmt: skip
    print("  families: " + ", ".join(f"{k} {v}" for k, v in families.most_common(12)) + ", ...")
    print("  kernels (C x kh x kw): " + ", ".join(f"{k} {v}" for k, v in kernels.most_common()))
    print(f"hosted: {len({c.repo for c in chosen})} repos, {mb(hosted)} of model.safetensors, "
          f"written in {write_s:.1f} s")  # fmt: skip
    total = sum(bases_s.values())
    print(
        f"bases: {len(bases_s)} shapes on {DATASET} in {total:.1f} s before the scan "
        "(" + ", ".join(f"{'x'.join(map(str, k))} {v:.2f}s" for k, v in bases_s.items()) + ")"
    )


def print_scan(title: str, run: ScanRun, models: int) -> None:
    """One scan's figures (and its failures, if any)."""
    s = run.summary
    engine = float(s.get("seconds", 0.0))
    failed = s.get("failed", [])
    print(f"\n{title}: wall {run.wall:.2f} s (engine {engine:.2f} s), exit {run.returncode}")
    if run.wall and s.get("stored"):
        print(f"  {s['stored'] / run.wall:.1f} models/s wall, "
              f"{s['stored'] / max(engine, 1e-9):.1f} models/s engine")  # fmt: skip
    print(f"  stored {s.get('stored')}, skipped {s.get('skipped_stored')}, failed {len(failed)}, "
          f"bases computed {len(s.get('bases_computed', []))}")  # fmt: skip
    per = run.sent / models if models else 0
    print(f"  server: {run.requests} requests, {mb(run.sent)} sent ({mb(per)} per model); "
          f"scan's own count {mb(s.get('bytes_fetched', 0))}")  # fmt: skip
    for item in failed[:20]:
        print(f"  failed: {item['name']}: {item['error']}: {item['message'][:160]}")
    if not s:
        print("  no JSON summary; stderr tail:\n" + run.stderr[-2000:])


def print_pairs(title: str, pairs: Sequence[tuple[FetchRun, FetchRun]]) -> None:
    """Ranged vs full-download rows with the baseline/ours ratios."""
    print(f"\n{title}")
    header = (f"{'models':>6} {'threads':>7} {'how':<14} {'time':>9} {'sent':>11} "
              f"{'per model':>11} {'requests':>8}")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for ours, base in pairs:
        for r in (ours, base):
            print(f"{r.models:>6} {r.workers:>7} {r.label:<14} {r.seconds:>8.2f}s "
                  f"{mb(r.sent):>11} {mb(r.sent / r.models):>11} {r.requests:>8}")  # fmt: skip
        print(f"{'':>6} {'':>7} {'ratio full/ours':<14} {base.seconds / ours.seconds:>8.1f}x "
              f"{base.sent / ours.sent:>10.0f}x")  # fmt: skip


def print_summary(rows: list[tuple[str, str]]) -> None:
    """The closing table."""
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * 78 + "\nSUMMARY\n" + "=" * 78)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=200, help="models to scan (default 200)")
    p.add_argument("--workers", type=int, default=8, help="scan workers / threads (default 8)")
    p.add_argument("--filler-mb", type=float, default=8.0, help="filler tensor per checkpoint")
    p.add_argument("--baseline-seq", type=int, default=20, help="models fetched sequentially")
    p.add_argument("--emulate-models", type=int, default=24, help="subset on the emulated link")
    p.add_argument("--mbps", type=float, default=100.0, help="emulated link, Mbit/s")
    p.add_argument("--rtt-ms", type=float, default=30.0, help="emulated delay per request, ms")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the figures."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zooscan-bench-scan-") as tmp_name:
        run_all(args, Path(tmp_name))


def run_all(args: argparse.Namespace, tmp: Path) -> None:
    """Every step of the module docstring, in a temporary directory."""
    dirs = isolate_environment(tmp)
    from hub_server import HubServer

    with HubServer() as server:
        os.environ["HF_ENDPOINT"] = server.endpoint  # before timm / huggingface_hub load
        sel = select(args.models, args.filler_mb)
        chosen = sel.chosen
        tags = [c.tag for c in chosen]
        start = time.perf_counter()
        paths = write_checkpoints(chosen, tmp / "files", args.filler_mb)
        hosted = host(server, paths)
        write_s = time.perf_counter() - start
        bases, bases_s = compute_bases({c.kernel for c in chosen})
        print_selection(sel, hosted, write_s, bases_s)
        print(f"\ncommand: {' '.join(scan_command(['TAG...'], tmp / 'zoo.h5', args.workers))}")
        seed_store(tmp / "zoo.h5", bases)
        first = run_scan(server, tags, tmp / "zoo.h5", args.workers)
        print_scan(f"scan of {len(tags)} models, {args.workers} workers", first, len(tags))
        again = run_scan(server, tags, tmp / "zoo.h5", args.workers)
        print_scan("same scan re-run (resume)", again, len(tags))
        startup = startup_seconds(server)
        print(f"\nprocess start alone (python -m zooscan sources): {startup:.2f} s")
        seq = min(args.baseline_seq, len(chosen))
        pairs = compare(server, chosen, args.workers, seq, dirs["HF_HUB_CACHE"])
        print_pairs("first layers: ranged reads (zooscan) vs full downloads (loopback)", pairs)
        emulated = emulate(args, server, chosen, bases, tmp, dirs["HF_HUB_CACHE"])
    rows = summary_rows(args, chosen, bases_s, first, again, pairs, startup) + emulated
    print_summary(rows)


def emulate(
    args: argparse.Namespace,
    server: Any,
    chosen: Sequence[Candidate],
    bases: Sequence[Any],
    tmp: Path,
    cache_dir: str,
) -> list[tuple[str, str]]:
    """The scan and both fetch strategies on an emulated link (a subset)."""
    subset = list(chosen[: max(0, args.emulate_models)])
    if not subset:
        return []
    link = args.mbps * 1e6 / 8
    server.latency = args.rtt_ms / 1000
    server.bandwidth = link / args.workers
    print(f"\n--- emulated link: {args.mbps:g} Mbit/s shared by {args.workers} workers "
          f"({args.mbps / args.workers:g} Mbit/s per response), {args.rtt_ms:g} ms per request")  # fmt: skip
    seed_store(tmp / "emulated.h5", bases)
    run = run_scan(server, [c.tag for c in subset], tmp / "emulated.h5", args.workers)
    print_scan(f"scan of {len(subset)} models, {args.workers} workers (emulated)", run, len(subset))
    ours = timed_fetch(server, "ranged", ranged_fetch, subset, args.workers, cache_dir)
    base = timed_fetch(server, "full download", full_download, subset, args.workers, cache_dir)
    print_pairs("first layers on the emulated link", [(ours, base)])
    server.latency, server.bandwidth = 0.0, None
    label = f"emulated {args.mbps:g} Mbit/s, {args.rtt_ms:g} ms ({len(subset)} models)"
    stored = run.summary.get("stored", 0)
    return [
        (f"{label}: scan", f"{run.wall:.1f} s wall, {stored / max(run.wall, 1e-9):.1f} models/s"),
        (
            f"{label}: fetch",
            f"ranged {ours.seconds:.2f} s vs full {base.seconds:.2f} s "
            f"({base.seconds / ours.seconds:.0f}x); bytes {base.sent / ours.sent:.0f}x",
        ),
    ]


def summary_rows(
    args: argparse.Namespace,
    chosen: Sequence[Candidate],
    bases_s: dict,
    first: ScanRun,
    again: ScanRun,
    pairs: Sequence[tuple[FetchRun, FetchRun]],
    startup: float,
) -> list[tuple[str, str]]:
    """The closing table's rows for the loopback runs."""
    n = len(chosen)
    s1, s2 = first.summary, again.summary
    engine = float(s1.get("seconds", 0.0)) or 1e-9
    ours, base = pairs[-1]
    real = sum(c.checkpoint_bytes for c in chosen)
    tensors = sum(c.tensor_bytes for c in chosen)
    return [
        ("models / workers", f"{n} timm tags / {args.workers}"),
        ("bases (before the scan)", f"{len(bases_s)} shapes, {sum(bases_s.values()):.1f} s"),
        (
            "scan (loopback)",
            f"{first.wall:.1f} s wall = {s1.get('stored', 0) / first.wall:.1f} models/s "
            f"(engine {engine:.1f} s = {s1.get('stored', 0) / engine:.1f} models/s)",
        ),
        (
            "  stored / failed",
            f"{s1.get('stored')} / {len(s1.get('failed', []))} "
            f"{s1.get('failures_by_reason') or ''}".rstrip(),
        ),
        (
            "  server bytes",
            f"{mb(first.sent)} total, {mb(first.sent / n)} per model, {first.requests} requests",
        ),
        (
            "  first-layer tensors",
            f"{mb(tensors)} total; overhead (sent - tensors) {mb((first.sent - tensors) / n)} "
            "per model",
        ),
        (
            "resume (same command)",
            f"{again.wall:.1f} s wall (engine {float(s2.get('seconds', 0)):.2f} s), "
            f"{again.requests} requests, stored {s2.get('stored')}, "
            f"skipped {s2.get('skipped_stored')}",
        ),
        ("  process start alone", f"{startup:.1f} s (python -m zooscan sources)"),
        (
            f"fetch only, {n} models x {ours.workers} threads",
            f"ranged {ours.seconds:.2f} s, {mb(ours.sent)} | full {base.seconds:.2f} s, "
            f"{mb(base.sent)}",
        ),
        (
            "  ratio full/ranged (loopback)",
            f"time {base.seconds / ours.seconds:.1f}x, bytes {base.sent / ours.sent:.0f}x "
            f"(files have a {args.filler_mb:g} MB filler)",
        ),
        (
            "  real checkpoint sizes",
            f"{real / 1e9:.2f} GB for these {n} tags (meta state dicts) = "
            f"{real / max(first.sent, 1):.0f}x the scan's bytes",
        ),
    ]


if __name__ == "__main__":
    main()
