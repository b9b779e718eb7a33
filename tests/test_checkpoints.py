"""zooscan.checkpoints on files written by the real libraries (torch, safetensors, numpy)."""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from zooscan import checkpoints as ck
from zooscan.errors import CheckpointError

KEY = "conv1.weight"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    """A real torchvision ResNet-18 state dict (random init, seeded)."""
    torch.manual_seed(0)
    return resnet18(weights=None).state_dict()


def _write_torch_zip(sd, path: Path) -> None:
    torch.save(sd, path)


def _write_torch_legacy(sd, path: Path) -> None:
    torch.save(sd, path, _use_new_zipfile_serialization=False)


def _write_safetensors(sd, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _write_npz(sd, path: Path) -> None:
    np.savez(path, **{k: v.numpy() for k, v in sd.items()})


def _write_npz_compressed(sd, path: Path) -> None:
    np.savez_compressed(path, **{k: v.numpy() for k, v in sd.items()})


# (writer, file name, format, byte ranges expected)
WRITERS = {
    "torch-zip": (_write_torch_zip, "model.pth", "torch-zip", True),
    "torch-legacy": (_write_torch_legacy, "model.pt", "torch-legacy", False),
    "safetensors": (_write_safetensors, "model.safetensors", "safetensors", True),
    "npz": (_write_npz, "model.npz", "npz", True),
    "npz-compressed": (_write_npz_compressed, "model_c.npz", "npz", False),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha(t: torch.Tensor) -> str:
    return _sha(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@pytest.fixture(params=sorted(WRITERS))
def written(request, tmp_path, state_dict):
    writer, name, fmt, has_ranges = WRITERS[request.param]
    path = tmp_path / name
    writer(state_dict, path)
    return path, fmt, has_ranges


# ---------------------------------------------------------------------------- reading


def test_reads_first_layer_bit_exact(written, state_dict):
    path, fmt, has_ranges = written
    assert ck.checkpoint_format(path) == fmt
    loaded = ck.read_tensors(path, [KEY])[KEY]
    expected = state_dict[KEY]
    assert loaded.key == KEY
    assert loaded.array.dtype == np.float32 and loaded.array.flags.c_contiguous
    assert np.array_equal(loaded.array, expected.numpy())
    assert loaded.shape == (64, 3, 7, 7) and loaded.dtype == "float32"
    assert loaded.sha256 == _tensor_sha(expected)
    if has_ranges:
        start, end = loaded.byte_range
        raw = path.read_bytes()[start:end]
        assert len(raw) == expected.numel() * 4
        assert _sha(raw) == loaded.sha256
        assert np.array_equal(np.frombuffer(raw, "<f4").reshape(64, 3, 7, 7), expected.numpy())
    else:
        assert loaded.byte_range is None


def test_list_tensors_covers_everything_in_storage_order(written, state_dict):
    path, _, has_ranges = written
    infos = ck.list_tensors(path)
    assert {i.key for i in infos} == set(state_dict)
    for info in infos:
        assert info.shape == tuple(state_dict[info.key].shape)
        assert info.dtype == str(state_dict[info.key].dtype).removeprefix("torch.")
    if has_ranges:
        ranges = [i.byte_range for i in infos]
        assert ranges == sorted(ranges)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        raw = path.read_bytes()
        for info in infos:  # every range holds exactly that tensor's bytes
            start, end = info.byte_range
            assert _sha(raw[start:end]) == _tensor_sha(state_dict[info.key])


def test_torch_storage_order_is_file_order(tmp_path, state_dict):
    path = tmp_path / "m.pt"
    torch.save(state_dict, path)
    keys = [i.key for i in ck.list_tensors(path)]
    assert keys == list(state_dict)  # torch writes storages in pickling order
    assert ck.first_4d_tensor(path).key == KEY


def test_other_tensors_bytes_are_never_needed(tmp_path, state_dict):
    """Overwrite every other tensor's data with garbage: the first layer still reads
    exactly, so reading it depends on (and touches) only its own bytes."""
    for name, writer in (("a.pth", _write_torch_zip), ("a.safetensors", _write_safetensors)):
        path = tmp_path / name
        writer(state_dict, path)
        raw = bytearray(path.read_bytes())
        for info in ck.list_tensors(path):
            if info.key != KEY:
                start, end = info.byte_range
                raw[start:end] = b"\xff" * (end - start)
        path.write_bytes(bytes(raw))
        assert np.array_equal(ck.read_tensors(path, [KEY])[KEY].array, state_dict[KEY].numpy())
        assert np.isnan(ck.read_tensors(path, ["fc.weight"])["fc.weight"].array).all()


# ---------------------------------------------------------------------- nesting, keys


def test_nested_state_dict_with_module_prefix(tmp_path, state_dict):
    path = tmp_path / "ckpt.pt"
    wrapped = {"module." + k: v for k, v in state_dict.items()}
    torch.save({"state_dict": wrapped, "epoch": 7, "arch": "resnet18"}, path)
    loaded = ck.read_tensors(path, [KEY])[KEY]
    assert loaded.key == "state_dict.module.conv1.weight"
    assert np.array_equal(loaded.array, state_dict[KEY].numpy())
    start, end = loaded.byte_range
    assert _sha(path.read_bytes()[start:end]) == loaded.sha256


def test_model_wins_over_ema_but_ema_alone_is_found(tmp_path, state_dict):
    ema = {k: v + 1 for k, v in state_dict.items() if v.is_floating_point()}
    both = tmp_path / "both.pt"
    torch.save({"model": state_dict, "ema": ema, "optimizer": {"state": {0: {}}}}, both)
    assert np.array_equal(ck.read_tensors(both, [KEY])[KEY].array, state_dict[KEY].numpy())
    only_ema = tmp_path / "ema.pt"
    torch.save({"state_dict_ema": ema}, only_ema)
    loaded = ck.read_tensors(only_ema, [KEY])[KEY]
    assert loaded.key == "state_dict_ema.conv1.weight"
    assert np.array_equal(loaded.array, ema[KEY].numpy())


def test_resolve_key_rules():
    keys = ["backbone.body.conv1.weight", "model.module.stem.weight", "conv1.weight"]
    assert ck.resolve_key(keys, "conv1.weight") == "conv1.weight"
    assert ck.resolve_key(keys, "stem.weight") == "model.module.stem.weight"
    assert ck.resolve_key(keys, "module.stem.weight") == "model.module.stem.weight"
    assert ck.resolve_key(keys, "backbone.body.conv1.weight") == "backbone.body.conv1.weight"
    assert ck.resolve_key(["_orig_mod.patch_embed.proj.weight"], "patch_embed.proj.weight")
    assert ck.resolve_key(["ema.x.w", "model.x.w"], "x.w") == "model.x.w"
    # "backbone." is a wrapper only at the front: body.conv1 is not conv1
    with pytest.raises(CheckpointError, match="close matches: .*backbone.body.conv1.weight"):
        ck.resolve_key(["backbone.body.conv1.weight", "fc.weight"], "conv1.weight")


def test_missing_key_error_lists_close_matches(tmp_path, state_dict):
    path = tmp_path / "m.safetensors"
    _write_safetensors(state_dict, path)
    with pytest.raises(CheckpointError) as err:
        ck.read_tensors(path, ["conv_1.weight"])
    message = str(err.value)
    assert "no tensor 'conv_1.weight'" in message and "conv1.weight" in message
    assert "\n" not in message


# --------------------------------------------------------------------- dtypes, layouts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("writer", [_write_safetensors, _write_torch_zip])
def test_reduced_precision_is_widened(tmp_path, state_dict, dtype, writer):
    weight = state_dict[KEY].to(dtype)
    path = tmp_path / ("w.safetensors" if writer is _write_safetensors else "w.pt")
    writer({"stem.weight": weight, "other": torch.ones(3)}, path)
    loaded = ck.read_tensors(path, ["stem.weight"])["stem.weight"]
    assert loaded.dtype == str(dtype).removeprefix("torch.")
    assert loaded.array.dtype == np.float32
    assert np.array_equal(loaded.array, weight.to(torch.float32).numpy())
    start, end = loaded.byte_range
    assert end - start == weight.numel() * weight.element_size()
    assert _sha(path.read_bytes()[start:end]) == loaded.sha256 == _tensor_sha(weight)


def test_views_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    sd = {"slice": base[2], "transposed": base.t(), "whole": base}
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    got = ck.read_tensors(path, list(sd))
    raw = path.read_bytes()
    start, end = got["slice"].byte_range  # a row of a shared storage: offset 24 elements
    assert np.array_equal(np.frombuffer(raw[start:end], "<f4"), base[2].numpy())
    assert got["transposed"].byte_range is None  # stored bytes are not its C order
    assert np.array_equal(got["transposed"].array, base.t().numpy())
    assert got["transposed"].sha256 == _tensor_sha(base.t())


def test_first_4d_tensor_skips_tokens_and_buffers(tmp_path):
    sd = collections.OrderedDict(
        cls_token=torch.zeros(1, 1, 8),
        pos_embed=torch.zeros(1, 5, 8),
        norm_running_mean=torch.zeros(8),
        proj_weight=torch.ones(8, 3, 4, 4),
        head_weight=torch.ones(10, 8, 1, 1),
    )
    path = tmp_path / "vit.pt"
    torch.save(sd, path)
    info = ck.first_4d_tensor(path)
    assert (info.key, info.shape) == ("proj_weight", (8, 3, 4, 4))
    flat = tmp_path / "flat.npz"
    np.savez(flat, a=np.zeros(3), b=np.zeros((2, 2)))
    with pytest.raises(CheckpointError, match="no 4-D tensor among 2 tensors"):
        ck.first_4d_tensor(flat)


def test_scan_torch_pickle_indexes_without_loading(tmp_path, state_dict):
    path = tmp_path / "m.pt"
    torch.save({"model": state_dict}, path)
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    refs = ck.scan_torch_pickle(data)
    ref = refs["model.conv1.weight"]
    assert (ref.shape, ref.stride, ref.dtype, ref.offset) == (
        (64, 3, 7, 7),
        (147, 49, 7, 1),
        "float32",
        0,
    )
    assert ref.is_contiguous and ref.nbytes == 64 * 147 * 4


# ------------------------------------------------------------------------ failures


class _Evil:
    """Unpickling this would create a file (stands in for arbitrary code)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_torch_zip_is_refused_and_never_runs(tmp_path, state_dict):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": state_dict[KEY], "payload": _Evil(target)}, path)
    for call in (lambda: ck.read_tensors(path, [KEY]), lambda: ck.list_tensors(path)):
        with pytest.raises(CheckpointError, match="refused to unpickle.*io.open"):
            call()
        assert not target.exists()
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    with pytest.raises(CheckpointError, match="references io.open"):
        ck.scan_torch_pickle(data)
    assert not target.exists()


def test_malicious_legacy_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"conv1.weight": _Evil(target)}, protocol=2))
    with pytest.raises(CheckpointError, match="refused to unpickle.*io.open"):
        ck.read_tensors(path, [KEY])
    assert not target.exists()


def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ck.read_tensors(tmp_path / "absent.pt", [KEY])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty file \(0 bytes\)"):
        ck.list_tensors(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unknown format"):
        ck.list_tensors(garbage)
    with pytest.raises(CheckpointError, match="not a regular file"):
        ck.list_tensors(tmp_path)
    other_zip = tmp_path / "docs.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="neither a torch checkpoint nor an npz"):
        ck.list_tensors(other_zip)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_truncated_files_fail_cleanly(tmp_path, state_dict, name):
    writer, file_name, _, _ = WRITERS[name]
    path = tmp_path / file_name
    writer(state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        ck.read_tensors(path, [KEY])
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_corrupt_safetensors_headers(tmp_path, state_dict):
    good = tmp_path / "good.safetensors"
    _write_safetensors({KEY: state_dict[KEY]}, good)
    raw = good.read_bytes()
    bad_json = tmp_path / "bad_json.safetensors"
    n = int.from_bytes(raw[:8], "little")
    bad_json.write_bytes(raw[:8] + b"{" + b"!" * (n - 1) + raw[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        ck.read_tensors(bad_json, [KEY])
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    with pytest.raises(CheckpointError):
        ck.list_tensors(huge)


def test_torch_pickle_stream_corruption(tmp_path, state_dict):
    path = tmp_path / "m.pt"
    torch.save({KEY: state_dict[KEY]}, path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data[: len(data) // 2]
            dst.writestr(info, data)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError):
        ck.read_tensors(path, [KEY])
