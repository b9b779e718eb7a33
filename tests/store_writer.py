"""A store writer for the crash-safety tests (run as a script, SIGKILLed at random).

``python store_writer.py STORE N [--compact-every K]`` commits the models
``model_name(0..N-1)`` that the store does not hold yet, printing ``committed <name>``
(flushed) after each :meth:`Store.commit_model` returns, then ``done``. The weights
and analyses derive from the name alone, so a test can recompute what was written.
It also records a failure for every fifth model's ghost and stores one basis, so
kills land in every kind of journal entry.

``python store_writer.py STORE --full-disk`` commits models 0-2, then limits the size
of any file it writes to 1 kB (``RLIMIT_FSIZE``, as a full disk would) and tries to
commit model 3, printing ``refused <message>`` when the store refuses it.

``python store_writer.py STORE --hold`` opens the store for writing, prints
``locked`` and holds the writer lock until its standard input closes.
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import zlib

import numpy as np

from zooscan.errors import StoreError
from zooscan.records import Analysis, FirstLayer, ModelRecord, PatchBasis, Provenance
from zooscan.store import Store

SOURCE = "crash"
SHAPES = ((8, 3, 3, 3), (6, 3, 5, 5), (4, 1, 7, 7), (5, 3, 7, 7))


def model_name(i: int) -> str:
    """Names with the characters that need escaping (``/``, ``.``, spaces, unicode)."""
    return f"org-{i % 3}/model {i:03d}.v1-ü"


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode("utf-8")))


def make_record(i: int) -> ModelRecord:
    """The record the writer commits for model ``i`` (deterministic)."""
    name = model_name(i)
    rng = _rng(name)
    out, c, kh, kw = SHAPES[i % len(SHAPES)]
    weight = rng.standard_normal((out, c, kh, kw)).astype(np.float32)
    d = c * kh * kw
    projections = rng.standard_normal((out, d))
    energy = np.sqrt(np.mean(projections**2, axis=0))
    layer = FirstLayer(
        weight=weight,
        module="stem.conv",
        stride=(i % 3 + 1, i % 3 + 1),
        padding=(kh // 2, kw // 2),
        mean=(0.485, 0.456, 0.406)[:c],
        std=(0.229, 0.224, 0.225)[:c],
        flags={"index": i},
        provenance=Provenance(repo=f"org-{i % 3}", sha256=f"{zlib.crc32(weight.tobytes()):08x}"),
        metadata={"seed": i},
    )
    analysis = Analysis(f"noise~{c}x{kh}x{kw}~centered", projections, energy / energy.max())
    return ModelRecord(
        SOURCE, name, layer, [analysis], scanned_at=f"2025-01-01T00:00:{i % 60:02d}Z"
    )


def make_basis() -> PatchBasis:
    """A small basis (deterministic) stored by every writer run."""
    rng = np.random.default_rng(7)
    patches = rng.standard_normal((500, 27))
    second = patches.T @ patches / len(patches)
    values, vectors = np.linalg.eigh(second)
    order = np.argsort(values)[::-1]
    return PatchBasis(
        dataset="noise",
        channels=3,
        kh=3,
        kw=3,
        centered=False,
        components=vectors[:, order],
        eigenvalues=values[order],
        mean=patches.mean(axis=0),
        second_moment=second,
        n_patches=500,
        n_images=1,
    )


def run(path: str, n: int, compact_every: int) -> None:
    with Store(path, mode="a", compact_every=compact_every, compact_ratio=0.0) as store:
        store.put_basis(make_basis())
        for i in range(n):
            name = model_name(i)
            if store.has_model(SOURCE, name):
                continue
            if i % 5 == 0:
                store.record_failure("ghost", name, "CheckpointError", f"attempt at {i}")
            store.commit_model(make_record(i))
            print(f"committed {name}", flush=True)
    print("done", flush=True)


def full_disk(path: str) -> None:
    with Store(path, mode="a", compact_every=2, compact_ratio=0.0) as store:
        for i in range(3):
            store.commit_model(make_record(i))
            print(f"committed {model_name(i)}", flush=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            store.commit_model(make_record(3))
            print(f"committed {model_name(3)}", flush=True)
        except StoreError as exc:
            print(f"refused {exc}", flush=True)
    print("done", flush=True)


def hold(path: str) -> None:
    with Store(path, mode="a"):
        print("locked", flush=True)
        sys.stdin.read()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("n", type=int, nargs="?", default=0)
    parser.add_argument("--compact-every", type=int, default=3)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--full-disk", action="store_true")
    args = parser.parse_args(argv)
    if args.hold:
        hold(args.store)
    elif args.full_disk:
        full_disk(args.store)
    else:
        run(args.store, args.n, args.compact_every)


if __name__ == "__main__":
    main()
