"""Hostile and broken input through the real CLI: each gets one clear line, a non-zero
exit where it is fatal, a recorded failure (the scan goes on) where it concerns one
model, and nothing already stored is touched.

The checkpoints are real files written by the real libraries (``torch.save``,
``safetensors``, ``numpy.savez``, ``zipfile``) and then damaged or crafted byte by
byte; pickles carry payloads that would create a marker file if anything ran them.
``benchmarks/report_hostile.py`` runs the same catalogue (:data:`HOSTILE`) and prints
the table for the issue's closing note.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import zooscan
from zooscan import plugins
from zooscan.cli import build_cli
from zooscan.errors import CheckpointError, ZooscanError
from zooscan.records import FirstLayer, ModelRef, Provenance
from zooscan.store import Store

# ------------------------------------------------------------------ payloads


class SystemPayload:
    """Unpickling this runs ``touch MARKER`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class PathPayload:
    """Unpickling this creates MARKER through ``pathlib.Path.touch``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# ------------------------------------------------------------------ file builders


def weight(seed: int, shape=(8, 3, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


W = weight(0)
W_BYTES = W.tobytes()
HUGE = (W / np.abs(W).max() * 3e38).astype(np.float32)
"""Finite float32 weights near the largest float32."""


def st_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype="F32", shape=(8, 3, 3, 3), offsets=(0, 864)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def write_bytes(data: bytes) -> Callable[[Path, Path], None]:
    return lambda path, marker_dir: path.write_bytes(data)


def write_safetensors(path: Path, marker_dir: Path, tensors: dict | None = None) -> None:
    save_file(tensors or {"conv.weight": W, "conv.bias": np.zeros(8, np.float32)}, str(path))


def truncated_safetensors(path: Path, marker_dir: Path) -> None:
    write_safetensors(path, marker_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def torch_zip(path: Path, marker_dir: Path) -> None:
    torch.save({"conv.weight": torch.from_numpy(W)}, path)


def pickle_zip(payload: type) -> Callable[[Path, Path], None]:
    def write(path: Path, marker_dir: Path) -> None:
        marker = marker_dir / f"{path.name}.ran"
        torch.save({"conv.weight": torch.from_numpy(W), "extra": payload(marker)}, path)

    return write


def pickle_legacy(path: Path, marker_dir: Path) -> None:
    payload = SystemPayload(marker_dir / f"{path.name}.ran")
    tensors = {"conv.weight": torch.from_numpy(W), "extra": payload}
    torch.save(tensors, path, _use_new_zipfile_serialization=False)


def pickle_plain(path: Path, marker_dir: Path) -> None:
    payload = SystemPayload(marker_dir / f"{path.name}.ran")
    path.write_bytes(pickle.dumps({"conv.weight": payload}, protocol=4))


def pickle_cycle(path: Path, marker_dir: Path) -> None:
    loop: list = []
    loop.append(loop)
    torch.save({"conv.weight": torch.from_numpy(W), "loop": loop}, path)


def pickle_fanout(path: Path, marker_dir: Path) -> None:
    """A 2**40-leaf tree of shared lists: a few hundred bytes of pickle."""
    node: list = [torch.from_numpy(W)]
    for _ in range(40):
        node = [node, node]
    torch.save({"tree": node}, path)


def npz_object_array(path: Path, marker_dir: Path) -> None:
    cell = np.empty((1, 1, 1, 1), dtype=object)
    cell[0, 0, 0, 0] = SystemPayload(marker_dir / f"{path.name}.ran")
    np.savez(path, conv=cell)


MemberWriter = Callable[[zipfile.ZipFile, zipfile.ZipInfo, bytes], None]


def rewrite_zip(path: Path, members: dict[str, MemberWriter]) -> None:
    """Rewrite the zip at ``path``; members whose name ends with a key of ``members``
    are written by that function, the others copied."""
    source = path.read_bytes()
    with zipfile.ZipFile(path, "w") as dst, zipfile.ZipFile(io.BytesIO(source)) as src:
        for info in src.infolist():
            data = src.read(info)
            custom = next((f for k, f in members.items() if info.filename.endswith(k)), None)
            if custom is None:
                dst.writestr(info, data)
            else:
                custom(dst, info, data)


def deflated_with_zeros(n_bytes: int):
    """Write the member deflated, followed by ``n_bytes`` zeros (inflating honestly)."""

    def write(dst: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        out = zipfile.ZipInfo(info.filename)
        out.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(out, "w", force_zip64=True) as fh:
            fh.write(data)
            chunk = bytes(1 << 20)
            for _ in range(n_bytes >> 20):
                fh.write(chunk)

    return write


def deflated(dst: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
    dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)


def set_declared_size(path: Path, suffix: str, size: int) -> None:
    """Make the central directory and the local header claim ``size`` uncompressed bytes
    for the member whose name ends with ``suffix`` (the data stay as they are)."""
    raw = bytearray(path.read_bytes())
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<3H", raw, pos + 28)
        name = bytes(raw[pos + 46 : pos + 46 + name_len]).decode()
        if name.endswith(suffix):
            struct.pack_into("<I", raw, pos + 24, size)
            (local,) = struct.unpack_from("<I", raw, pos + 42)
            struct.pack_into("<I", raw, local + 22, size)
        pos = raw.find(b"PK\x01\x02", pos + 46 + name_len + extra_len + comment_len)
    path.write_bytes(bytes(raw))


def data_pkl_bomb(path: Path, marker_dir: Path) -> None:
    torch_zip(path, marker_dir)
    rewrite_zip(path, {"data.pkl": deflated_with_zeros(192 << 20)})


def data_pkl_lying_size(path: Path, marker_dir: Path) -> None:
    torch_zip(path, marker_dir)
    set_declared_size(path, "data.pkl", 3 << 30)


def storage_lying_size(path: Path, marker_dir: Path) -> None:
    torch_zip(path, marker_dir)
    rewrite_zip(path, {"data/0": deflated})
    set_declared_size(path, "data/0", 2 << 30)


def storage_stored_lying_size(path: Path, marker_dir: Path) -> None:
    torch_zip(path, marker_dir)
    set_declared_size(path, "data/0", 1 << 30)


def zip_absurd_count(path: Path, marker_dir: Path) -> None:
    """The end record claims 60 000 members in a directory of a few hundred bytes."""
    torch_zip(path, marker_dir)
    raw = bytearray(path.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    struct.pack_into("<2H", raw, eocd + 8, 60000, 60000)
    path.write_bytes(bytes(raw))


def zip_huge_directory(path: Path, marker_dir: Path) -> None:
    """A sparse 48 MiB file whose end record claims a 40 MiB central directory."""
    size = 48 << 20
    with open(path, "wb") as fh:
        fh.write(b"PK\x03\x04")
        fh.truncate(size - 22)
        fh.seek(size - 22)
        fh.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1000, 1000, 40 << 20, 0, 0))


def npz_lying_shape(path: Path, marker_dir: Path) -> None:
    """An ``.npy`` header claiming a 53 MB array in front of 864 bytes of data."""
    np.savez(path, conv=W)
    raw = path.read_bytes()
    old, new = b"(8, 3, 3, 3)", b"(90000, 3, 7, 7)"
    header_len = struct.unpack_from("<H", raw, raw.index(b"\x93NUMPY") + 8)[0]
    assert len(new) - len(old) < header_len  # the header's padding absorbs the change
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        data = src.read("conv.npy")
        start = data.index(old)
        pad_end = 10 + header_len - 1  # keep the header length: eat spaces before "\n"
        patched = data[:start] + new + data[start + len(old) : pad_end - (len(new) - len(old))]
        dst.writestr("conv.npy", patched + data[pad_end:])
    tmp.replace(path)


def npz_bomb(path: Path, marker_dir: Path) -> None:
    np.savez_compressed(path, conv=W)
    set_declared_size(path, "conv.npy", 3 << 30)


def truncated_torch_zip(path: Path, marker_dir: Path) -> None:
    torch_zip(path, marker_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def with_sidecar(write: Callable[[Path, Path], None], sidecar: dict):
    def both(path: Path, marker_dir: Path) -> None:
        write(path, marker_dir)
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar))

    return both


def deep_json() -> bytes:
    depth = 200_000
    header = b'{"conv.weight": %s, "x": {"a": %s}}' % (
        json.dumps(entry()).encode(),
        b"[" * depth + b"]" * depth,
    )
    return st_bytes(header, W_BYTES)


# ------------------------------------------------------------------ the catalogue


@dataclass(frozen=True)
class Hostile:
    """One hostile input for the ``files`` source."""

    file: str
    write: Callable[[Path, Path], None]
    """``write(path, marker_dir)``: payloads aim their marker files into ``marker_dir``."""
    expect: str
    """Text the one-line failure message must contain."""
    error: str = "CheckpointError"
    kind: str = "checkpoint"

    @property
    def name(self) -> str:
        """The model name the ``files`` source gives the file."""
        return self.file.rsplit(".", 1)[0]


HOSTILE = [
    # pickles carrying code
    Hostile(
        "pickle_os_system.pt", pickle_zip(SystemPayload), "references posix.system", kind="pickle"
    ),
    Hostile(
        "pickle_path_touch.pt",
        pickle_zip(PathPayload),
        "references __builtin__.getattr",
        kind="pickle",
    ),
    Hostile("pickle_legacy.pth", pickle_legacy, "GLOBAL posix.system", kind="pickle"),
    Hostile("pickle_plain.pth", pickle_plain, "refused to unpickle", kind="pickle"),
    Hostile(
        "npz_object_array.npz", npz_object_array, "holds Python objects (a pickle)", kind="pickle"
    ),
    Hostile("pickle_cycle.pt", pickle_cycle, "nests containers more than 64 deep", kind="pickle"),
    Hostile("pickle_fanout.pt", pickle_fanout, "more than 1000000 entries", kind="pickle"),
    # broken safetensors
    Hostile(
        "st_zero_bytes.safetensors", write_bytes(b""), "empty file (0 bytes)", kind="safetensors"
    ),
    Hostile(
        "st_truncated.safetensors",
        truncated_safetensors,
        "truncated safetensors file",
        kind="safetensors",
    ),
    Hostile(
        "st_corrupt_json.safetensors",
        write_bytes(st_bytes(b'{"conv.weight": {"dtype": "F32", "sha', W_BYTES)),
        "corrupt safetensors header",
        kind="safetensors",
    ),
    Hostile(
        "st_header_past_end.safetensors",
        write_bytes(struct.pack("<Q", 4096) + b'{"a": 1}'),
        "claims 4096 bytes, file has 16",
        kind="safetensors",
    ),
    Hostile(
        "st_header_2p60.safetensors",
        write_bytes(struct.pack("<Q", 2**60) + b"{" + b" " * 200),
        f"claims {2**60} bytes",
        kind="safetensors",
    ),
    Hostile(
        "st_header_100mb.safetensors",
        write_bytes(struct.pack("<Q", 100 * 2**20 + 1) + b"{" + b" " * 200),
        f"claims {100 * 2**20 + 1} bytes",
        kind="safetensors",
    ),
    Hostile(
        "st_json_array.safetensors",
        write_bytes(st_bytes(b"[1, 2, 3]")),
        "not a safetensors, torch or npz checkpoint",
        kind="safetensors",
    ),
    Hostile(
        "st_entry_not_object.safetensors",
        write_bytes(st_bytes({"conv.weight": [0, 864]}, W_BYTES)),
        "entry for 'conv.weight' (not a JSON object)",
        kind="safetensors",
    ),
    Hostile(
        "st_deep_json.safetensors",
        write_bytes(deep_json()),
        "nested too deeply",
        kind="safetensors",
    ),
    Hostile(
        "st_duplicate_key.safetensors",
        write_bytes(
            st_bytes(
                b'{"conv.weight": %s, "conv.weight": %s}'
                % (json.dumps(entry()).encode(), json.dumps(entry()).encode()),
                W_BYTES,
            )
        ),
        "duplicate key 'conv.weight'",
        kind="safetensors",
    ),
    Hostile(
        "st_offsets_outside.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(offsets=(10_000, 10_864))}, W_BYTES)),
        "'conv.weight' ends at byte",
        kind="safetensors",
    ),
    Hostile(
        "st_overlapping.safetensors",
        write_bytes(
            st_bytes(
                {"conv.weight": entry(), "other.weight": entry(offsets=(432, 1296))},
                W_BYTES * 2,
            )
        ),
        "'other.weight' overlaps 'conv.weight'",
        kind="safetensors",
    ),
    Hostile(
        "st_unknown_dtype.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(dtype="F128")}, W_BYTES)),
        "unknown dtype 'F128'",
        kind="safetensors",
    ),
    Hostile(
        "st_negative_shape.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(shape=(-8, 3, 3, 3))}, W_BYTES)),
        "shape [-8, 3, 3, 3]",
        kind="safetensors",
    ),
    Hostile(
        "st_shape_overflow.safetensors",
        # 2**62 * 4 * 4 bytes wraps to 0 in int64: an empty tensor to a careless reader
        write_bytes(st_bytes({"conv.weight": entry(shape=(2**62, 4, 1, 1), offsets=(0, 0))})),
        "do not hold float32[4611686018427387904, 4, 1, 1]",
        kind="safetensors",
    ),
    Hostile(
        "st_absurd_rank.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(shape=(1,) * 40, offsets=(0, 4))}, W_BYTES)),
        "not a list of at most 32 sizes",
        kind="safetensors",
    ),
    Hostile(
        "st_length_mismatch.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(offsets=(0, 800))}, W_BYTES)),
        "bytes [0, 800) do not hold float32[8, 3, 3, 3]",
        kind="safetensors",
    ),
    Hostile(
        "st_float4.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(dtype="F4", offsets=(0, 108))}, W_BYTES[:108])),
        "float4",
        kind="safetensors",
    ),
    Hostile(
        "st_complex.safetensors",
        write_bytes(st_bytes({"conv.weight": entry(dtype="C64", offsets=(0, 1728))}, W_BYTES * 2)),
        "complex64, not a real-valued weight",
        kind="safetensors",
    ),
    # values
    Hostile(
        "nan_weights.safetensors",
        lambda p, m: write_safetensors(p, m, {"conv.weight": np.where(W > 1, np.nan, W)}),
        "NaN/Inf values",
        error="ModelError",
        kind="values",
    ),
    Hostile(
        "inf_weights.safetensors",
        lambda p, m: write_safetensors(p, m, {"conv.weight": np.where(W > 1, np.inf, W)}),
        "NaN/Inf values",
        error="ModelError",
        kind="values",
    ),
    Hostile(
        "overflowing_std.safetensors",
        with_sidecar(
            lambda p, m: write_safetensors(p, m, {"conv.weight": HUGE}), {"std": [1e-200] * 3}
        ),
        "is not on the [0, 1] pixel scale",
        error="ModelError",
        kind="values",
    ),
    Hostile(
        "key_2d.safetensors",
        with_sidecar(
            lambda p, m: write_safetensors(p, m, {"conv.weight": W, "fc.weight": W[:, :, 0, 0]}),
            {"key": "fc.weight"},
        ),
        "is 2-D [8, 3]: a linear patch embedding needs option patch",
        error="ModelError",
        kind="values",
    ),
    Hostile(
        "key_1d.safetensors",
        with_sidecar(write_safetensors, {"key": "conv.bias"}),
        "has shape [8]: a first layer is 4-D",
        error="ModelError",
        kind="values",
    ),
    # zips
    Hostile("zip_data_pkl_bomb.pt", data_pkl_bomb, "refused as a zip bomb", kind="zip"),
    Hostile("zip_data_pkl_lying.pt", data_pkl_lying_size, "refused as a zip bomb", kind="zip"),
    Hostile("zip_storage_lying.pt", storage_lying_size, "refused as a zip bomb", kind="zip"),
    Hostile(
        "zip_stored_lying.pt",
        storage_stored_lying_size,
        "claims 1073741824 bytes but holds 864",
        kind="zip",
    ),
    Hostile(
        "zip_absurd_count.pt",
        zip_absurd_count,
        "60000 members claimed in a central directory",
        kind="zip",
    ),
    Hostile(
        "zip_huge_directory.pt", zip_huge_directory, "larger than any checkpoint's", kind="zip"
    ),
    Hostile("zip_truncated.pt", truncated_torch_zip, "corrupt or truncated", kind="zip"),
    Hostile(
        "npz_lying_shape.npz",
        npz_lying_shape,
        "declares float32[90000, 3, 7, 7] (52920000 bytes) but holds 864 bytes",
        kind="zip",
    ),
    Hostile("npz_bomb.npz", npz_bomb, "refused as a zip bomb", kind="zip"),
    Hostile(
        "garbage.pt",
        write_bytes(np.random.default_rng(1).bytes(5000)),
        "unknown format",
        kind="checkpoint",
    ),
]


def write_hostile_zoo(folder: Path, marker_dir: Path) -> list[Hostile]:
    """Write every :data:`HOSTILE` file (and sidecar) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in HOSTILE:
        case.write(folder / case.file, marker_dir)
    return HOSTILE


# ------------------------------------------------------------------ CLI and store helpers


def cli(*args: object, cwd: Path | None = None):
    """Run the real CLI in-process; never a traceback."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(build_cli(), [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert "Traceback" not in result.output, result.output
    return result


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def snapshot(store_path: Path) -> dict:
    """Every stored model's bytes: weight, energy and projections per basis, provenance."""
    out = {}
    with Store(store_path, mode="r") as store:
        for source, name in store.models():
            m = store.load_model(source, name)
            out[(source, name)] = (
                np.asarray(m.layer.weight).tobytes(),
                {b: e.tobytes() for b, e in m.energy.items()},
                {b: p.tobytes() for b, p in m.projections.items()},
                m.layer.provenance.sha256,
                m.scanned_at,
            )
    return out


def not_store_files(paths: set[str], store: str) -> set[str]:
    """``paths`` other than the store and its side files (``zoo.h5.journal``, ``.lock``)."""
    return {p for p in paths if p != store and not p.startswith(f"{store}.")}


def tree(root: Path) -> dict[str, int | None]:
    """Every path under ``root`` with its size (``None`` for directories)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.stat().st_size)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, photo_folder) -> tuple[Path, str]:
    """A store holding two good models (and their basis) that hostile scans must not touch."""
    root = tmp_path_factory.mktemp("base")
    good = root / "good"
    good.mkdir()
    save_file({"stem.weight": weight(1, (16, 3, 3, 3))}, str(good / "base_a.safetensors"))
    torch.save({"stem.weight": torch.from_numpy(weight(2))}, good / "base_b.pt")
    store = root / "store" / "zoo.h5"
    store.parent.mkdir()
    dataset = f"folder:{photo_folder}"
    result = cli("scan", "--source", "files", good, "--store", store, "--dataset", dataset)
    assert result.exit_code == 0, result.output
    return store, dataset


def copy_store(base: Path, target_dir: Path) -> Path:
    shutil.copytree(base.parent, target_dir)
    return target_dir / base.name


@pytest.fixture(scope="module")
def hostile_scan(tmp_path_factory, base_store):
    """One scan of the whole hostile zoo (plus one good file) into a copy of the base
    store, from a scratch working directory."""
    base, dataset = base_store
    root = tmp_path_factory.mktemp("hostile")
    marker_dir = root / "markers"
    marker_dir.mkdir()
    zoo = root / "zoo"
    write_hostile_zoo(zoo, marker_dir)
    save_file({"stem.weight": weight(3)}, str(zoo / "fresh_ok.safetensors"))
    store = copy_store(base, root / "store")
    before = snapshot(store)
    work = root / "cwd"
    work.mkdir()
    result = cli("scan", "--source", "files", zoo, "--store", store, "--dataset", dataset, cwd=work)
    with Store(store, mode="r") as s:
        failures = {f["name"]: f for f in s.failures("files")}
        names = {n for _, n in s.models("files")}
    return {
        "result": result,
        "store": store,
        "before": before,
        "failures": failures,
        "names": names,
        "markers": marker_dir,
        "cwd": work,
        "zoo": zoo,
    }


# ------------------------------------------------------------------ per-model hostile input


def test_payloads_would_run_if_anything_unpickled_them(tmp_path):
    """The markers' absence below means something: plain unpickling runs every payload."""
    for payload in (SystemPayload, PathPayload):
        marker = tmp_path / f"{payload.__name__}.ran"
        pickle.loads(pickle.dumps(payload(marker)))
        assert marker.exists()
    torch_pickles = ("pickle_os_system.pt", "pickle_path_touch.pt", "pickle_legacy.pth")
    for case in (c for c in HOSTILE if c.file in torch_pickles):  # torch's unrestricted load
        markers = tmp_path / case.name
        markers.mkdir()
        case.write(tmp_path / case.file, markers)
        torch.load(tmp_path / case.file, weights_only=False)
        assert [p.name for p in markers.iterdir()] == [f"{case.file}.ran"]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.file)
def test_hostile_file_is_one_recorded_failure(hostile_scan, case):
    failure = hostile_scan["failures"].get(case.name)
    assert failure is not None, f"{case.file} was not recorded as a failure"
    assert failure["error_class"] == case.error
    message = failure["message"]
    assert case.expect in message
    assert "\n" not in message and not message.startswith("unexpected")
    lines = [
        line
        for line in hostile_scan["result"].output.splitlines()
        if line.startswith(f"failed: {case.name}:")
    ]
    assert lines == [f"failed: {case.name}: {case.error}: {message}"]
    assert case.name not in hostile_scan["names"]


def test_hostile_scan_goes_on_and_touches_nothing_stored(hostile_scan):
    result = hostile_scan["result"]
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        f"Error: {len(HOSTILE)} of {len(HOSTILE) + 1} models failed (recorded in "
        f"{hostile_scan['store']}; see `zooscan ls --failures`, retry with --retry-failed)"
    ]
    assert hostile_scan["names"] == {"base_a", "base_b", "fresh_ok"}
    after = snapshot(hostile_scan["store"])
    before = hostile_scan["before"]
    assert {key: after[key] for key in before} == before
    assert list(hostile_scan["markers"].iterdir()) == []  # no payload ran
    assert list(hostile_scan["cwd"].iterdir()) == []


def test_retrying_hostile_files_fails_the_same_way(hostile_scan, base_store, tmp_path):
    """--retry-failed reads every hostile file again: same failures, same stored bytes."""
    _, dataset = base_store
    store = copy_store(hostile_scan["store"], tmp_path / "store")
    before = snapshot(store)
    zoo = hostile_scan["zoo"]
    args = ("scan", "--source", "files", zoo, "--store", store, "--dataset", dataset)
    result = cli(*args, "--retry-failed", "--format", "json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["stored"] == 0 and summary["skipped_stored"] == 1  # fresh_ok
    assert {f["name"]: f["message"] for f in summary["failed"]} == {
        name: f["message"] for name, f in hostile_scan["failures"].items()
    }
    assert snapshot(store) == before
    assert list(hostile_scan["markers"].iterdir()) == []


def test_key_option_on_a_2d_tensor_fails_clearly(base_store, tmp_path):
    _, dataset = base_store
    path = tmp_path / "m.safetensors"
    write_safetensors(path, tmp_path, {"conv.weight": W, "fc.weight": W[:, :, 0, 0]})
    store = tmp_path / "zoo.h5"
    args = ("scan", "--source", "files", path, "--store", store, "--dataset", dataset)
    result = cli(*args, "--key", "fc.weight")
    assert result.exit_code == 1
    assert "failed: m: ModelError: tensor 'fc.weight' is 2-D [8, 3]" in result.output
    result = cli(*args, "--key", "fc.weight", "-o", "patch=3x1x1", "--retry-failed")
    assert result.exit_code == 0, result.output
    with Store(store) as s:
        assert s.load_model("files", "m").layer.kind == "linear"


# ------------------------------------------------------------------ fatal: the store itself


@pytest.fixture
def scan_args(base_store, tmp_path):
    _, dataset = base_store
    path = tmp_path / "ok.safetensors"
    save_file({"stem.weight": weight(5)}, str(path))
    return ("scan", "--source", "files", path, "--dataset", dataset)


def _other_hdf5(path: Path, base: Path) -> None:
    with h5py.File(path, "w") as h5:
        h5["data"] = np.arange(4)


def _newer_schema(path: Path, base: Path) -> None:
    shutil.copy(base, path)
    with h5py.File(path, "a") as h5:
        h5.attrs["schema_version"] = np.int64(99)


def _truncated_store(path: Path, base: Path) -> None:
    path.write_bytes(base.read_bytes()[: base.stat().st_size // 2])


STORE_CASES = {
    "text file": (lambda p, b: p.write_text("not an HDF5 file"), "is not an HDF5 file"),
    "empty file": (lambda p, b: p.write_bytes(b""), "is not an HDF5 file"),
    "other HDF5": (_other_hdf5, "is an HDF5 file but not a zooscan store"),
    "truncated store": (_truncated_store, "is corrupt or unreadable as an HDF5 file"),
    "newer schema": (_newer_schema, "has store schema version 99, newer than this zooscan reads"),
}
"""``kind: (make(path, base_store), what the one error line says)``."""


@pytest.mark.parametrize("kind", sorted(STORE_CASES))
def test_bad_store_is_one_line_and_left_byte_identical(kind, base_store, scan_args, tmp_path):
    make, expect = STORE_CASES[kind]
    folder = tmp_path / "stores"
    folder.mkdir()
    path = folder / "zoo.h5"
    make(path, base_store[0])
    raw = path.read_bytes()
    for args in (scan_args, ("ls",), ("corr",), ("show", "base_a"), ("fit", "--all")):
        result = cli(*args, "--store", path)
        assert result.exit_code == 1, (args, result.output)
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"Error: {path} {expect}"), (args, line)
    assert path.read_bytes() == raw
    assert sorted(p.name for p in folder.iterdir()) == ["zoo.h5"]  # no journal, no lock


def test_store_that_is_a_directory_is_refused(scan_args, tmp_path):
    folder = tmp_path / "zoo.h5"
    (folder / "inside").mkdir(parents=True)
    for args in (scan_args, ("ls",)):
        result = cli(*args, "--store", folder)
        assert result.exit_code != 0
        assert error_lines(result.output) == [
            f"Error: Invalid value for '--store': File '{folder}' is a directory."
        ]
    assert tree(folder) == {"inside": None}


def test_store_in_a_missing_folder_is_refused(scan_args, tmp_path):
    path = tmp_path / "missing" / "zoo.h5"
    result = cli(*scan_args, "--store", path)
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        f"Error: cannot create {path}: directory {path.parent} does not exist"
    ]
    assert not path.parent.exists()


# ------------------------------------------------------------------ names


def _names() -> list[str]:
    long_name = "deep/" * 40 + "x" * 3000
    return [
        "../../etc/passwd",
        "/abs/path/model",
        "..",
        ".",
        ".hidden",
        "",
        "a/./b",
        "a//b",
        "org/model@v1:latest",
        "with space and\ttab",
        "new\nline",
        "nul\x00byte",
        "bell\x07del\x7f",
        "percent%2Fslash",
        "%",
        "back\\slash",
        unicodedata.normalize("NFC", "café/modèle"),
        unicodedata.normalize("NFD", "café/modèle"),
        "Ωmega-μ-日本語-🚀",
        "trailing.",
        "dots.in.the.name",
        long_name,
    ]


class NamesSource:
    """A source whose model names are hostile; every model is a real checkpoint's layer."""

    name = "names"
    checkpoint: Path | None = None
    """The real checkpoint every model reads (set by the ``hostile_sources`` fixture)."""

    def __init__(self, options: dict[str, str]) -> None:
        self.path = self.checkpoint

    def list_models(self, patterns):
        for name in _names():
            yield ModelRef(self.name, name, {})

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        from zooscan.checkpoints import read_tensors

        tensor = read_tensors(self.path, ["stem.weight"])["stem.weight"]
        return FirstLayer(
            weight=tensor.array,
            module="stem",
            provenance=Provenance(tensor_key=tensor.key, sha256=tensor.sha256),
        )


class OverflowSource(NamesSource):
    """One model whose finite weights overflow float64 once mapped to pixel space."""

    name = "overflow"

    def list_models(self, patterns):
        yield ModelRef(self.name, "overflow", {})

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        layer = super().load_first_layer(ref)
        layer.weight = HUGE
        layer.std = (1e-200,) * 3
        return layer


class HostileSourcesPlugin:
    @zooscan.hookimpl
    def register_sources(self, register) -> None:
        register(NamesSource)
        register(OverflowSource)


@pytest.fixture
def hostile_sources(tmp_path):
    """Register :class:`NamesSource` and :class:`OverflowSource` for one test."""
    ckpt = tmp_path / "ckpt" / "layer.safetensors"
    ckpt.parent.mkdir()
    save_file({"stem.weight": weight(7)}, str(ckpt))
    pm = plugins.new_plugin_manager(extra={"hostile_sources": HostileSourcesPlugin()})
    with pytest.MonkeyPatch.context() as patch:  # undone before the plugin state is reset
        patch.setattr(NamesSource, "checkpoint", ckpt)
        patch.setattr(plugins, "plugin_manager", lambda: pm)
        yield ckpt


def test_hostile_names_are_stored_and_read_back_exactly(hostile_sources, base_store, tmp_path):
    _, dataset = base_store
    store_dir = tmp_path / "store"
    store = copy_store(base_store[0], store_dir)
    before = snapshot(store)
    outside = tree(tmp_path)
    result = cli("scan", "--source", "names", "--store", store, "--dataset", dataset)
    assert result.exit_code == 0, result.output
    with Store(store, mode="r") as s:
        stored = sorted(n for src, n in s.models("names"))
        for name in _names():
            model = s.load_model("names", name)
            assert model.name == name
            np.testing.assert_array_equal(model.layer.weight, weight(7))
    assert stored == sorted(_names())
    listed = json.loads(cli("ls", "--source", "names", "--format", "json", "--store", store).stdout)
    assert sorted(row["name"] for row in listed) == sorted(_names())
    after = snapshot(store)
    assert {k: after[k] for k in before} == before
    assert not_store_files(set(tree(tmp_path)) - set(outside), "store/zoo.h5") == set()
    with h5py.File(store, "r") as h5:
        links = list(h5["models"]["names"])
    assert len(links) == len(_names())
    assert all(link and "/" not in link and not link.startswith(".") for link in links)


def test_an_energy_profile_of_nan_is_never_stored(hostile_sources, base_store, tmp_path):
    """Finite weights that become ~1e238 in pixel space: the profile is computed without
    overflow (it is scale-free) and equals that of the same filters at a normal scale."""
    from zooscan.energy import energy_profile

    _, dataset = base_store
    store = tmp_path / "zoo.h5"
    result = cli("scan", "--source", "overflow", "--store", store, "--dataset", dataset)
    assert result.exit_code == 0, result.output
    with Store(store, mode="r") as s:
        stored = s.load_model("overflow", "overflow")
        ((basis_id, profile),) = stored.energy.items()
        basis = s.get_basis(basis_id)
    assert np.isfinite(profile).all()
    # HUGE is W rescaled and rounded to float32: equal to float32 precision
    np.testing.assert_allclose(profile, energy_profile(W.astype(np.float64), basis), rtol=1e-6)


def test_file_names_become_exact_model_names(base_store, tmp_path):
    """Names from the file system (unicode NFC and NFD twins, control and HDF5-special
    characters, long nested paths) are stored as they are, and nothing is written
    beside the store."""
    _, dataset = base_store
    zoo = tmp_path / "zoo"
    rel_names = [
        unicodedata.normalize("NFC", "uni/café"),
        unicodedata.normalize("NFD", "uni/café"),
        "ctl/tab\there",
        "ctl/new\nline",
        "odd/%2F.percent",
        "odd/a..b",
        "odd/colon:name",
        "odd/back\\slash",
        "odd/-dash",
        "/".join(["nest" + "n" * 200] * 6) + "/m",
    ]
    for i, rel in enumerate(rel_names):
        path = zoo / (rel + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"stem.weight": weight(10 + i)}, str(path))
    store = tmp_path / "out" / "zoo.h5"
    store.parent.mkdir()
    before = tree(tmp_path)
    result = cli("scan", "--source", "files", zoo, "--store", store, "--dataset", dataset)
    assert result.exit_code == 0, result.output
    with Store(store, mode="r") as s:
        assert sorted(n for _, n in s.models("files")) == sorted(rel_names)
        for i, rel in enumerate(rel_names):
            np.testing.assert_array_equal(s.load_model("files", rel).layer.weight, weight(10 + i))
    assert not_store_files(set(tree(tmp_path)) - set(before), "out/zoo.h5") == set()


# ------------------------------------------------------------------ remote


def _hf_repo(root: Path, name: str, config, weights: Callable[[Path], None]) -> Path:
    """A tiny transformers repository whose ``pytorch_model.bin`` is written by ``weights``."""
    out = root / name
    config.save_pretrained(out)
    processor = {"image_processor_type": "ConvNextImageProcessor", "do_normalize": True}
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    weights(out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def hostile_hub(tmp_path_factory):
    from hub_server import HubServer

    root = tmp_path_factory.mktemp("hub")
    markers = root / "markers"
    markers.mkdir()
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    state = transformers.ResNetForImageClassification(config).state_dict()

    def evil_zip(path: Path) -> None:
        big = torch.zeros(1 << 20)  # 4 MB after the payload: a refusal never fetches it
        torch.save({**state, "extra": SystemPayload(markers / "zip.ran"), "big": big}, path)

    def evil_legacy(path: Path) -> None:
        payload = PathPayload(markers / "legacy.ran")
        torch.save({**state, "extra": payload}, path, _use_new_zipfile_serialization=False)

    def good(path: Path) -> None:
        torch.save(state, path)

    repos = {
        "acme/evil-zip": _hf_repo(root, "evil_zip", config, evil_zip),
        "acme/evil-legacy": _hf_repo(root, "evil_legacy", config, evil_legacy),
        "acme/good": _hf_repo(root, "good", config, good),
    }
    with HubServer() as server:
        for repo_id, folder in repos.items():
            files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
            server.add_repo(
                repo_id, files, pipeline_tag="image-classification", library_name="transformers"
            )
        yield server, markers, repos


def test_remote_pickles_with_code_are_refused_through_the_hf_source(
    hostile_hub, base_store, monkeypatch, tmp_path
):
    from hub_server import free_env

    hub, markers, _ = hostile_hub
    free_env(monkeypatch, tmp_path)
    hub.use_as_hf_endpoint(monkeypatch)
    hub.reset_log()
    _, dataset = base_store
    store = copy_store(base_store[0], tmp_path / "store")
    before = snapshot(store)
    repos = ["acme/evil-zip", "acme/evil-legacy", "acme/good"]
    result = cli(
        "scan", "--source", "hf", *repos, "--store", store, "--dataset", dataset, cwd=tmp_path
    )
    assert result.exit_code == 1, result.output
    lines = {
        line.split(":", 2)[1].strip(): line
        for line in result.output.splitlines()
        if line.startswith("failed: ")
    }
    assert set(lines) == {"acme/evil-zip", "acme/evil-legacy"}
    assert "refused to unpickle: data.pkl references posix.system" in lines["acme/evil-zip"]
    assert "refused to unpickle" in lines["acme/evil-legacy"]
    assert "acme/evil-legacy/pytorch_model.bin" in lines["acme/evil-legacy"]
    assert list(markers.iterdir()) == []
    after = snapshot(store)
    assert {k: after[k] for k in before} == before
    assert ("hf", "acme/good") in after
    # the zip was refused from its central directory and data.pkl: never downloaded whole
    zip_size = (hostile_hub[2]["acme/evil-zip"] / "pytorch_model.bin").stat().st_size
    fetched = hub.body_bytes_sent(repo="acme/evil-zip", path="*pytorch_model.bin")
    assert zip_size > 4_000_000 and fetched < 200_000


def test_remote_hostile_files_raise_only_checkpoint_errors(tmp_path):
    """Every hostile file of the catalogue, served by the loopback hub and read by
    ranges: a CheckpointError (or a clean read for the value cases), never another
    exception, no marker file."""
    from hub_server import HubServer

    from zooscan.remote import HubClient, fetch_tensors

    markers = tmp_path / "markers"
    markers.mkdir()
    zoo = tmp_path / "zoo"
    cases = write_hostile_zoo(zoo, markers)
    value_cases = {c.file for c in cases if c.kind == "values"}
    with HubServer() as hub:
        hub.add_repo("x/hostile", {c.file: zoo / c.file for c in cases})
        client = HubClient(endpoint=hub.endpoint, token=False, backoff_base=0.01, backoff_max=0.02)
        for case in cases:
            f = client.resolve("x/hostile", case.file)
            try:
                fetch_tensors(client, f, ["conv.weight"])
            except CheckpointError as exc:
                assert case.file not in value_cases, (case.file, exc)
                assert "\n" not in str(exc)
            else:
                assert case.file in value_cases, f"{case.file} was read"
    assert list(markers.iterdir()) == []


# ------------------------------------------------------------------ paths


def test_sharded_index_pointing_outside_the_repo_is_refused(tmp_path):
    from hub_server import HubServer

    from zooscan.remote import HubClient, sharded_safetensors

    index = {
        "weight_map": {"a.weight": "../../other/model.safetensors", "b.weight": "ok.safetensors"}
    }
    with HubServer() as hub:
        hub.add_repo("acme/sharded", {"model.safetensors.index.json": json.dumps(index).encode()})
        client = HubClient(endpoint=hub.endpoint, token=False)
        with pytest.raises(CheckpointError, match="outside the repository: ../../other"):
            sharded_safetensors(client, "acme/sharded", None)
        for bad in ("/etc/passwd", "a/../../b", "C:\\evil", "sub\\..\\x", "", "a//b"):
            index["weight_map"]["a.weight"] = bad
            hub.add_repo(
                "acme/sharded", {"model.safetensors.index.json": json.dumps(index).encode()}
            )
            with pytest.raises(CheckpointError, match="outside the repository"):
                sharded_safetensors(client, "acme/sharded", None)
        index["weight_map"]["a.weight"] = "sub/shard-1.safetensors"
        hub.add_repo("acme/sharded", {"model.safetensors.index.json": json.dumps(index).encode()})
        assert (
            sharded_safetensors(client, "acme/sharded", None)["a.weight"]
            == "sub/shard-1.safetensors"
        )


def test_hf_sharded_index_never_reads_outside_its_repo(tmp_path, monkeypatch):
    from hub_server import HubServer, free_env

    transformers = pytest.importorskip("transformers")
    free_env(monkeypatch, tmp_path)
    out = tmp_path / "vit"
    torch.manual_seed(4)
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = transformers.ViTConfig(**tiny, image_size=32, patch_size=4)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(
        out, max_shard_size="20KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "embeddings.patch_embeddings.projection.weight"
    shard = index["weight_map"][key]
    index["weight_map"][key] = f"../../../../evil/other/resolve/main/{shard}"
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    with HubServer() as hub:
        hub.add_repo("acme/vit", files)
        hub.add_repo("evil/other", {shard: out / shard})
        hub.use_as_hf_endpoint(monkeypatch)
        source = plugins.get_source("hf", {})
        (ref,) = list(source.list_models(["acme/vit"]))
        with contextlib.suppress(ZooscanError):
            source.load_first_layer(ref)
        assert not hub.requests(repo="evil/other")
        assert all(
            r.path.startswith(("/acme/vit/", "/api/models/acme/vit"))
            for r in hub.requests()
            if not r.path.startswith("/_cdn/")
        )


@pytest.mark.parametrize(
    "filename", ["../../../../evil/other/resolve/main/w.safetensors", "/evil/other/w.safetensors"]
)
def test_hub_file_names_never_leave_their_repo(filename, tmp_path, monkeypatch):
    from hub_server import HubServer, free_env

    from zooscan.remote import HubClient

    free_env(monkeypatch, tmp_path)
    with HubServer() as hub:
        hub.add_repo("acme/x", {"w.safetensors": st_bytes({"w": entry()}, W_BYTES)})
        hub.add_repo("evil/other", {"w.safetensors": st_bytes({"w": entry()}, W_BYTES)})
        client = HubClient(endpoint=hub.endpoint, token=False, backoff_base=0.01)
        with contextlib.suppress(CheckpointError):
            client.resolve("acme/x", filename)
        assert [r.path for r in hub.requests()] == []


def test_scans_write_only_the_store(base_store, hostile_hub, tmp_path):
    """``python -m zooscan scan`` of local hostile files, then of hub repositories (a
    legacy pickle downloaded whole into a temporary folder), with HOME, the working
    directory, TMPDIR and the hub cache in scratch folders: the only new files are the
    store's, the hub cache stays empty, payloads never run."""
    _, dataset = base_store
    hub, hub_markers, _ = hostile_hub
    home, work, tmp, cache = (tmp_path / n for n in ("home", "cwd", "tmp", "hf"))
    zoo, markers = tmp_path / "zoo", tmp_path / "markers"
    for folder in (home, work, tmp, cache, zoo, markers, tmp_path / "out"):
        folder.mkdir()
    for case in HOSTILE:
        if case.kind == "pickle":
            case.write(zoo / case.file, markers)
    save_file({"stem.weight": weight(9)}, str(zoo / "ok.safetensors"))
    store = tmp_path / "out" / "zoo.h5"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "HF_HOME": str(cache),
        "HF_ENDPOINT": hub.endpoint,
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LANG": "C.UTF-8",
    }
    before = tree(tmp_path)
    scans = {
        "files": ["--source", "files", zoo],
        "hf": ["--source", "hf", "acme/evil-zip", "acme/evil-legacy", "acme/good"],
    }
    for source, args in scans.items():
        command = [sys.executable, "-m", "zooscan", "scan", *map(str, args)]
        command += ["--store", str(store), "--dataset", dataset]
        proc = subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        if source == "files":
            assert "Warning" not in proc.stderr, proc.stderr
    new = {p: size for p, size in tree(tmp_path).items() if p not in before}
    assert "out/zoo.h5" in new
    # libraries may leave empty folders in TMPDIR (torch's inductor cache dir), no files
    others = {p: new[p] for p in not_store_files(set(new), "out/zoo.h5")}
    assert all(p.startswith("tmp/") and size is None for p, size in others.items()), others
    assert list(markers.iterdir()) == [] and list(hub_markers.iterdir()) == []
    with Store(store, mode="r") as s:
        assert {n for _, n in s.models()} == {"ok", "acme/good"}
