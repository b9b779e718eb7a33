"""Fuzzing the checkpoint readers and the name escaping (hypothesis, derandomized).

Random and mutated bytes go into the safetensors header decoder, ``list_tensors`` /
``read_tensors`` (real files of every format, damaged), the restricted unpickler, the
zip central-directory reader and the ranged (remote) readers; the only exceptions
allowed out are :class:`~zooscan.errors.ZooscanError` subclasses, every example has a
deadline (no hang) and no file appears (nothing a pickle names is ever run). Escaping
any name and unescaping it gives the name back.

Examples are derandomized (a fixed sequence) and few, so CI is stable and quick; set
``ZOOSCAN_FUZZ_EXAMPLES`` (e.g. 5000) for a deeper local run.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from zooscan import checkpoints
from zooscan.errors import CheckpointError, StoreError, ZooscanError
from zooscan.remote import HubClient, RemoteFile, fetch_tensors, remote_index
from zooscan.remote.zipdir import (
    ZipEntry,
    find_central_directory,
    local_data_offset,
    parse_central_directory,
)
from zooscan.store.naming import escape_name, unescape_link, unescape_name

FUZZ = settings(
    max_examples=int(os.environ.get("ZOOSCAN_FUZZ_EXAMPLES", "60")),
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KEY = "conv.weight"


# ------------------------------------------------------------------ seed files


def _seed_files() -> dict[str, bytes]:
    """Small real checkpoints written by the real libraries, one per format."""
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = np.zeros(4, np.float32)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_file({KEY: conv, "conv.bias": bias}, str(root / "m.safetensors"))
        tensors = {KEY: torch.from_numpy(conv), "conv.bias": torch.from_numpy(bias)}
        torch.save(tensors, root / "m.pt")
        torch.save(tensors, root / "legacy.pt", _use_new_zipfile_serialization=False)
        np.savez(root / "m.npz", **{KEY: conv, "conv.bias": bias})
        np.savez_compressed(root / "c.npz", **{KEY: conv, "conv.bias": bias})
        for path in root.iterdir():
            out[path.name] = path.read_bytes()
    return out


SEEDS = _seed_files()
ZIP_SEED = SEEDS["m.pt"]
with zipfile.ZipFile(io.BytesIO(ZIP_SEED)) as _zf:
    DATA_PKL = _zf.read(next(n for n in _zf.namelist() if n.endswith("data.pkl")))
    _CD_OFFSET = _zf.start_dir
CENTRAL_DIRECTORY = ZIP_SEED[_CD_OFFSET : ZIP_SEED.rindex(b"PK\x05\x06")]


@st.composite
def mutated(draw, original: bytes, max_ops: int = 6) -> bytes:
    """``original`` with a few byte flips, overwrites, size-like integers, cuts and
    insertions at random places."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, max_ops))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "byte", "int", "cut", "insert"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op == "int" and pos + 8 <= len(data):
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**60, 2**64 - 1]))
            data[pos : pos + 8] = struct.pack("<Q", value)
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=32))
    return bytes(data)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty working directory and TMPDIR; the test checks both stay empty."""
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp_path
    assert list(work.iterdir()) == [], "a reader created a file in the working directory"
    assert list(tmp.iterdir()) == [], "a reader left a temporary file behind"


def _read_file(data: bytes, folder: Path, name: str) -> None:
    """``list_tensors`` and ``read_tensors`` on ``data``: ZooscanError or a consistent answer."""
    path = folder / name
    path.write_bytes(data)
    try:
        try:
            infos = checkpoints.list_tensors(path)
        except ZooscanError:
            return
        for info in infos:
            assert info.ndim == len(info.shape)
            if info.byte_range is not None:
                begin, end = info.byte_range
                assert 0 <= begin <= end <= len(data)
        try:
            loaded = checkpoints.read_tensors(path, [KEY])[KEY]
        except ZooscanError:
            return
        assert loaded.array.dtype == np.float32
        assert loaded.array.size == int(np.prod(loaded.shape))
    finally:
        path.unlink()


# ------------------------------------------------------------------ local readers


@FUZZ
@given(
    name=st.sampled_from(sorted(SEEDS)),
    data=st.data(),
)
def test_damaged_checkpoints_give_only_zooscan_errors(scratch, name, data):
    damaged = data.draw(mutated(SEEDS[name]))
    _read_file(damaged, scratch, name)


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes_give_only_zooscan_errors(scratch, raw):
    for suffix in (".safetensors", ".pt"):
        _read_file(raw, scratch, "random" + suffix)
        # the same bytes behind a plausible safetensors length prefix
        _read_file(struct.pack("<Q", len(raw)) + raw, scratch, "prefixed" + suffix)


# ------------------------------------------------------------------ safetensors header

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
SIZES = st.integers(min_value=-3, max_value=2**63) | st.integers(0, 64)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F4", "F128", "f32"])
        | st.text(max_size=4)
        | JSON,
        "shape": st.lists(SIZES, max_size=5) | JSON,
        "data_offsets": st.lists(SIZES, min_size=2, max_size=2)
        | st.lists(SIZES, max_size=3)
        | JSON,
    }
)
HEADER = st.dictionaries(
    st.sampled_from([KEY, "conv.bias", "__metadata__", "x"]) | st.text(max_size=6),
    ENTRY | JSON,
    max_size=4,
)


@FUZZ
@given(header=HEADER, data_len=st.integers(0, 256))
def test_safetensors_headers_are_validated(scratch, header, data_len):
    """Any JSON object as a header: a consistent index or a CheckpointError, locally and
    through the ranged reader."""
    import json

    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data_len)
    try:
        infos = checkpoints.safetensors_infos(header, 8 + len(raw), len(blob), "fuzz")
    except CheckpointError:
        infos = None
    if infos is not None:
        last = 0
        for info in infos:
            begin, end = info.byte_range
            assert 8 + len(raw) <= begin <= end <= len(blob)
            if begin < end:
                assert begin >= last  # no two tensors share a byte
                last = end
    _read_file(blob, scratch, "h.safetensors")
    _fetch(blob)


@FUZZ
@given(raw=st.binary(max_size=256) | st.text(max_size=64).map(str.encode))
def test_header_decoder_accepts_only_json_objects(raw):
    try:
        header = checkpoints.decode_safetensors_header(raw, "fuzz")
    except CheckpointError:
        return
    assert isinstance(header, dict)


@FUZZ
@given(first8=st.binary(max_size=10), size=st.integers(0, 2**64))
def test_header_length_is_checked_against_the_file(first8, size):
    try:
        n = checkpoints.safetensors_header_length(first8, size, "fuzz")
    except CheckpointError:
        return
    assert 0 <= n <= size - 8


def test_deeply_nested_header_is_a_checkpoint_error():
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(CheckpointError, match="nested too deeply"):
            checkpoints.decode_safetensors_header(raw, "fuzz")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        checkpoints.decode_safetensors_header(b'{"a": ' + b"9" * 5000 + b"}", "fuzz")
    with pytest.raises(CheckpointError, match="NaN is not valid JSON"):
        checkpoints.decode_safetensors_header(b'{"a": NaN}', "fuzz")


# ------------------------------------------------------------------ restricted unpickler

GLOBALS = [
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ctorch._tensor\n_rebuild_from_type_v2\n",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nSize\n",
    b"cposix\nsystem\n",
    b"cbuiltins\neval\n",
    b"c__builtin__\ngetattr\n",
]
OPCODES = st.one_of(
    st.sampled_from([b"(", b"}", b"]", b")", b"N", b"\x88", b"s", b"u", b"a", b"e", b"t"]),
    st.sampled_from([b"\x85", b"\x86", b"\x87", b"\x94", b"R", b"b", b"Q", b"0", b"2", b"1"]),
    st.sampled_from(GLOBALS),
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: b"J" + struct.pack("<i", i)),
    st.binary(max_size=9).map(lambda b: b"\x8a" + bytes([len(b)]) + b),
    st.text(max_size=12).map(lambda s: b"X" + struct.pack("<I", len(s.encode())) + s.encode()),
    st.sampled_from([b"storage", b"0", b"cpu", KEY.encode()]).map(
        lambda s: b"X" + struct.pack("<I", len(s)) + s
    ),
    st.integers(0, 8).map(lambda i: b"h" + bytes([i])),
    st.integers(0, 8).map(lambda i: b"q" + bytes([i])),
)


@FUZZ
@given(ops=st.lists(OPCODES, max_size=60))
def test_restricted_unpickler_on_random_opcodes(scratch, ops):
    """Opcode soup over the globals torch.save emits and a few that run code: an index
    of TorchTensorRefs or a CheckpointError; code is never resolved."""
    stream = b"\x80\x02" + b"".join(ops) + b"."
    try:
        refs = checkpoints.scan_torch_pickle(stream)
    except checkpoints.PickleRefused as exc:
        assert f"{exc.module}.{exc.name}".encode() in stream.replace(b"\n", b".")
        return
    except CheckpointError:
        return
    assert all(isinstance(r, checkpoints.TorchTensorRef) for r in refs.values())


@FUZZ
@given(data=st.data())
def test_restricted_unpickler_on_damaged_data_pkl(data):
    damaged = data.draw(mutated(DATA_PKL))
    try:
        refs = checkpoints.scan_torch_pickle(damaged)
    except CheckpointError:
        return
    assert all(isinstance(r, checkpoints.TorchTensorRef) for r in refs.values())


def test_restricted_unpickler_bounds_nesting_cycles_and_fanout():
    deep = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."
    cycle = b"\x80\x02]\x94h\x00a."  # a list that contains itself
    fanout = b"\x80\x02N" + b"q\x00h\x00\x86" * 60 + b"."  # 2**60 paths, shared tuples
    for stream, why in (
        (deep, "more than 64 deep"),
        (cycle, "more than 64 deep"),
        (fanout, "more than 1000000 entries"),
    ):
        assert pickle.loads(stream) is not None  # the streams are valid pickles
        with pytest.raises(CheckpointError, match=why):
            checkpoints.scan_torch_pickle(stream)


# ------------------------------------------------------------------ zip directory


@FUZZ
@given(data=st.data(), tail_cut=st.integers(0, 64))
def test_zip_end_records_on_damaged_tails(data, tail_cut):
    tail = data.draw(mutated(ZIP_SEED[-200:]))
    size = data.draw(st.integers(len(tail), len(tail) + 2**40))
    try:
        offset, cd_size, entries = find_central_directory(tail, size - len(tail), size)
    except CheckpointError:
        return
    assert offset >= 0 and offset + cd_size <= size and 0 <= entries * 46 <= cd_size


@FUZZ
@given(data=st.data(), entries=st.integers(0, 2**64 - 1), size=st.integers(0, 2**40))
def test_zip_central_directory_on_damaged_bytes(data, entries, size):
    directory = data.draw(mutated(CENTRAL_DIRECTORY))
    try:
        members = parse_central_directory(directory, entries, size)
    except CheckpointError:
        return
    for entry in members.values():
        assert entry.header_offset + 30 + entry.compressed_size <= size
        assert entry.method != 0 or entry.size == entry.compressed_size


@FUZZ
@given(header=st.binary(max_size=64), offset=st.integers(0, 2**40))
def test_zip_local_header_on_random_bytes(header, offset):
    entry = ZipEntry("m", 0, 0, 10, 10, offset)
    try:
        start = local_data_offset(header, entry)
    except CheckpointError:
        return
    assert start >= offset + 30


# ------------------------------------------------------------------ ranged (remote) readers


class BytesClient(HubClient):
    """The real client with its transport replaced by bytes in memory (no network)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(endpoint="http://127.0.0.1:9", token=False, offline=False)
        self.data = data

    def read_range(self, f: RemoteFile, start: int, end: int) -> bytes:
        if start < 0 or end < start or end > len(self.data):
            raise CheckpointError(f"bad byte range [{start}, {end})")
        return self.data[start:end]

    def read_all(self, f: RemoteFile) -> bytes:
        return self.data


def _fetch(blob: bytes) -> None:
    client = BytesClient(blob)
    f = RemoteFile(
        url="http://127.0.0.1:9/fuzz",
        repo="fuzz/x",
        revision=None,
        filename="f",
        size=len(blob),
        etag=None,
    )
    try:
        remote_index(client, f)
        result = fetch_tensors(client, f, [KEY])
    except ZooscanError:
        return
    loaded = result.tensors[KEY]
    assert loaded.array.size == int(np.prod(loaded.shape))
    if loaded.byte_range is not None:
        assert 0 <= loaded.byte_range[0] <= loaded.byte_range[1] <= len(blob)


@FUZZ
@given(name=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_ranged_readers_on_damaged_checkpoints(scratch, name, data):
    _fetch(data.draw(mutated(SEEDS[name])))


def test_ranged_reader_matches_the_local_reader_on_the_seeds(tmp_path):
    for name, blob in SEEDS.items():
        path = tmp_path / name
        path.write_bytes(blob)
        local = checkpoints.read_tensors(path, [KEY])[KEY]
        f = RemoteFile(
            url="http://127.0.0.1:9/x",
            repo="x/y",
            revision=None,
            filename=name,
            size=len(blob),
            etag=None,
        )
        remote = fetch_tensors(BytesClient(blob), f, [KEY]).tensors[KEY]
        assert remote.sha256 == local.sha256, name
        np.testing.assert_array_equal(remote.array, local.array)


# ------------------------------------------------------------------ names


@FUZZ
@given(name=st.text(max_size=64) | st.text(alphabet="./%~_-:\\\x00\n", max_size=16))
def test_escape_round_trip(name):
    escaped = escape_name(name)
    assert escaped and "/" not in escaped and not escaped.startswith(".")
    assert escaped.isascii() and escaped.isprintable()
    assert unescape_name(escaped) == name
    assert unescape_link(escaped) == name


@FUZZ
@given(link=st.text(max_size=24) | st.text(alphabet="%0123456789abcdefABCDEFGz./", max_size=12))
def test_unescape_link_rejects_only_with_store_errors(link):
    try:
        name = unescape_link(link)
    except StoreError:
        return
    assert isinstance(name, str)


def test_escape_keeps_unicode_forms_and_surrogates_apart():
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    assert nfc != nfd and escape_name(nfc) != escape_name(nfd)
    assert unescape_name(escape_name("\udc80x")) == "\udc80x"
    for bad in ("", "a/b", "%4", "%zz", "é"):
        with pytest.raises(StoreError):
            unescape_link(bad)


def test_fuzz_never_leaves_files(scratch):
    """The scratch fixture's own check, on a reader that downloads a legacy file whole
    into a temporary folder and refuses it."""
    payload = b"\x80\x02cposix\nsystem\nX\x05\x00\x00\x00touch\x85R."
    _read_file(payload, scratch, "legacy.pt")
    _fetch(payload)
    assert not os.path.exists(scratch / "cwd" / "touch")
