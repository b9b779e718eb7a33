"""The trainer's data preparation and training loop, on crops of real photographs.

The task: 32x32 crops of four scikit-image photographs, the class being the photograph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from zooscan.errors import UserError
from zooscan.records import LabelledImages
from zooscan_builtins.trainer.data import prepare
from zooscan_builtins.trainer.loop import TrainConfig, TrainResult, train
from zooscan_builtins.trainer.models import build_model, first_conv

CLASSES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the test machine's cores are shared, and OpenMP threads that
    wait on each other under contention make small convolutions many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo_crops(photos: dict[str, np.ndarray], per_class: int, seed: int) -> LabelledImages:
    """``per_class`` random 32x32 crops of each photograph (shorter side resized to 80)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        pil = Image.fromarray((photos[name] * 255).round().astype(np.uint8))
        scale = 80 / min(pil.size)
        small = np.asarray(pil.resize((round(pil.width * scale), round(pil.height * scale))))
        for _ in range(per_class):
            top = rng.integers(0, small.shape[0] - 31)
            left = rng.integers(0, small.shape[1] - 31)
            images.append(small[top : top + 32, left : left + 32].transpose(2, 0, 1))
            labels.append(label)
    return LabelledImages(np.stack(images), np.array(labels), CLASSES, f"crops-{seed}-{per_class}")


@pytest.fixture(scope="module")
def splits(photos) -> tuple[LabelledImages, LabelledImages]:
    return photo_crops(photos, 64, seed=0), photo_crops(photos, 32, seed=1)


@pytest.fixture(scope="module")
def data(splits):
    return prepare(*splits)


@pytest.fixture(scope="module")
def binary(splits):
    return prepare(*splits, target="binary")


def _tiny_linear(**kwargs) -> torch.nn.Module:
    return build_model(
        "linear", num_classes=kwargs.pop("num_classes", 1), width=0.125, seed=0, **kwargs
    )


# --------------------------------------------------------------------------- data


def test_prepare_normalises_both_splits_with_the_training_statistics(splits, data):
    train_set, test_set = splits
    pixels = train_set.images.astype(np.float64) / 255
    mean, std = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))
    np.testing.assert_allclose(data.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(data.std, std, rtol=1e-8)
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (256, 3, 32, 32)
    x = data.x_train.double()
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), unbiased=False), 1, atol=1e-5)
    expected_test = (test_set.images / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(data.x_test.numpy(), expected_test, atol=1e-5)
    assert data.y_train.dtype == torch.int64 and torch.equal(
        data.y_test, torch.from_numpy(test_set.labels)
    )
    assert data.classes == CLASSES and data.num_classes == 4 and data.output_dim == 4
    assert data.permutation is None and data.train_key == train_set.key


def test_random_labels_are_one_seeded_permutation_that_keeps_class_counts(splits):
    train_set, test_set = splits
    shuffled = prepare(train_set, test_set, labels="random", seed=3)
    y = shuffled.y_train.numpy()
    assert np.array_equal(np.bincount(y, minlength=4), np.bincount(train_set.labels, minlength=4))
    assert np.array_equal(y, train_set.labels[shuffled.permutation])
    assert np.array_equal(np.sort(shuffled.permutation), np.arange(len(train_set)))
    assert (y != train_set.labels).mean() > 0.5
    assert np.array_equal(shuffled.y_test.numpy(), test_set.labels)  # test labels stay true
    again = prepare(train_set, test_set, labels="random", seed=3)
    other = prepare(train_set, test_set, labels="random", seed=4)
    assert np.array_equal(again.permutation, shuffled.permutation)
    assert not np.array_equal(other.permutation, shuffled.permutation)


def test_binary_target_is_plus_one_for_the_lower_half_of_the_classes(splits, binary):
    expected = np.where(splits[0].labels < 2, 1.0, -1.0)
    assert binary.y_train.dtype == torch.float32
    assert np.array_equal(binary.y_train.numpy(), expected)
    assert binary.output_dim == 1 and binary.num_classes == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": "shuffled"}, "unknown labels"),
        ({"target": "ordinal"}, "unknown target"),
    ],
)
def test_prepare_rejects_unknown_modes(splits, change, message):
    with pytest.raises(UserError, match=message):
        prepare(*splits, **change)


def test_prepare_rejects_mismatched_splits(splits):
    train_set, test_set = splits
    renamed = LabelledImages(test_set.images, test_set.labels, ("a", "b", "c", "d"), "x")
    with pytest.raises(UserError, match="different classes"):
        prepare(train_set, renamed)
    gray = LabelledImages(test_set.images[:, :1], test_set.labels, CLASSES, "gray")
    with pytest.raises(UserError, match="channels"):
        prepare(train_set, gray)


# --------------------------------------------------------------------------- learning


def _final_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = model.cpu().eval()(x)
    return float((out.argmax(dim=1) == y).double().mean())


@pytest.mark.parametrize(
    ("arch", "optimizer", "lr"),
    [("linear", "adam", 0.05), ("vgg11_bn", "adam", 0.003)],
)
def test_training_learns_real_photographs(data, arch, optimizer, lr):
    model = build_model(arch, num_classes=4, width=0.25, seed=0)
    cfg = TrainConfig(epochs=6, batch_size=32, optimizer=optimizer, lr=lr, eval_every=2)
    seen: list[dict] = []
    result = train(model, data, cfg, progress=seen.append)
    m = result.metrics
    assert list(m["epoch"]) == [0, 2, 4, 6] and list(m["step"]) == [0, 16, 32, 48]
    assert m["train_loss"][-1] < 0.5 * m["train_loss"][0]
    assert m["test_acc"][-1] >= 0.6  # chance is 0.25
    assert m["train_acc"][-1] >= 0.6
    assert m["test_acc"][-1] == pytest.approx(_final_accuracy(model, data.x_test, data.y_test))
    assert np.all(np.diff(m["seconds"]) > 0)
    assert [row["step"] for row in seen] == list(m["step"]) and seen[0]["total_steps"] == 48
    assert result.total_steps == 48 and result.batch_size == 32 and result.device == "cpu"
    assert len(result.epoch_seconds) == 6 and result.images_per_second > 0
    assert not result.amp and result.channels_last == (arch != "linear")


def test_mse_on_class_targets_sums_squared_errors_over_one_hot_classes(data):
    model = build_model("linear", num_classes=4, width=0.25, seed=1)
    with torch.no_grad():
        out = model.eval()(data.x_train).double()
    onehot = F.one_hot(data.y_train, 4).double()
    expected = ((out - onehot) ** 2).sum(dim=1).mean()
    result = train(model, data, TrainConfig(steps=1, loss="mse", eval_every=0))
    assert result.metrics["train_loss"][0] == pytest.approx(float(expected), rel=1e-5)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("steps", "every", "expected"),
    [(10, 3, [0, 3, 6, 9, 10]), (10, 5, [0, 5, 10]), (10, 0, [0, 10]), (7, 10, [0, 7])],
)
def test_snapshot_schedule_is_exact(binary, steps, every, expected):
    model = _tiny_linear()
    init = first_conv(model).weight.detach().clone()
    cfg = TrainConfig(steps=steps, batch_size=64, loss="mse", snapshot_every=every, eval_every=0)
    result = train(model, binary, cfg)
    assert result.steps.tolist() == expected and result.steps.dtype == np.int64
    assert result.snapshots.shape == (len(expected), 8, 3, 3, 3)
    assert result.snapshots.dtype == np.float32
    assert np.array_equal(result.snapshots[0], init.numpy())
    assert np.array_equal(result.snapshots[-1], first_conv(model).weight.detach().numpy())
    assert not np.array_equal(result.snapshots[1], result.snapshots[0])


def test_a_snapshot_holds_the_weights_after_exactly_that_many_steps(binary):
    cfg = dict(batch_size=64, loss="mse", eval_every=0, seed=5)
    long = train(_tiny_linear(), binary, TrainConfig(steps=10, snapshot_every=3, **cfg))
    short = train(_tiny_linear(), binary, TrainConfig(steps=6, **cfg))
    assert np.array_equal(long.snapshots[2], short.snapshots[-1])


def test_epochs_and_evaluation_rows(binary):
    cfg = TrainConfig(epochs=5, batch_size=64, loss="mse", eval_every=2, snapshot_every=4)
    result = train(_tiny_linear(), binary, cfg)
    assert result.metrics["epoch"].tolist() == [0, 2, 4, 5]
    assert result.metrics["step"].tolist() == [0, 8, 16, 20]
    assert result.steps.tolist() == [0, 4, 8, 12, 16, 20]
    partial = train(_tiny_linear(), binary, TrainConfig(steps=10, batch_size=64, loss="mse"))
    assert partial.metrics["step"].tolist() == [0, 4, 8, 10]
    assert partial.metrics["epoch"].tolist() == [0, 1, 2, 2.5]
    assert len(partial.epoch_seconds) == 3
    drop_last = train(_tiny_linear(), binary, TrainConfig(epochs=1, batch_size=100, loss="mse"))
    assert drop_last.total_steps == 2  # 256 images: two full batches of 100, the rest dropped
    ends = train(
        _tiny_linear(), binary, TrainConfig(steps=3, batch_size=64, loss="mse", eval_every=0)
    )
    assert ends.metrics["step"].tolist() == [0, 3]
    full = train(
        _tiny_linear(), binary, TrainConfig(steps=40, batch_size=None, lr=1e-3, loss="mse")
    )
    assert full.metrics["step"].tolist() == list(range(0, 41, 2))  # about 20 rows by default


def test_frozen_first_layer_stays_at_init_while_the_rest_trains(data):
    model = build_model("vgg11_bn", num_classes=4, width=0.25, seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="adam", lr=0.003, freeze_first=True,
                      snapshot_every=5)  # fmt: skip
    result = train(model, data, cfg)
    conv = first_conv(model)
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    assert all(
        np.array_equal(snap, before["first_conv.weight"].numpy()) for snap in result.snapshots
    )
    assert torch.equal(conv.bias, before["first_conv.bias"])
    trained = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "first_conv.weight" not in trained and "classifier.6.weight" in trained
    assert sum(k.endswith("weight") for k in trained) >= 10
    assert result.metrics["train_loss"][-1] < result.metrics["train_loss"][0]


def test_same_seed_gives_identical_weights_on_cpu(data):
    def run(seed: int) -> tuple[dict[str, torch.Tensor], TrainResult]:
        model = build_model("vgg11", num_classes=4, width=0.125, seed=0)  # dropout: seeded too
        cfg = TrainConfig(steps=12, batch_size=32, optimizer="momentum", lr=0.01, seed=seed)
        return model.state_dict(), train(model, data, cfg)

    (a, ra), (b, rb), (c, _) = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(ra.snapshots, rb.snapshots)
    for name in ("train_loss", "test_acc"):
        assert np.array_equal(ra.metrics[name], rb.metrics[name])
    assert not torch.equal(a["classifier.6.weight"], c["classifier.6.weight"])


# --------------------------------------------------------------------------- full batch


def _gradient_descent(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, lr: float,
                      steps: int, momentum: float) -> list[np.ndarray]:  # fmt: skip
    """The linear CNN's full-batch (heavy-ball) GD on L = mean_x (y - sum_k p̄(x).w_k)^2,
    written out in float64: every filter gets the same gradient (2/N) sum_x (ŷ - y) p̄(x)."""
    mean_patch = F.unfold(x.double(), w0.shape[-1]).mean(dim=2)  # (N, d), (c, kh, kw) order
    w = w0.double().reshape(w0.shape[0], -1)
    velocity, out = torch.zeros(w.shape[1], dtype=torch.float64), [w0.numpy()]
    for _ in range(steps):
        residual = mean_patch @ w.sum(dim=0) - y.double()
        grad = 2 * residual @ mean_patch / len(y)
        velocity = momentum * velocity + grad
        w = w - lr * velocity
        out.append(w.reshape(w0.shape).numpy())
    return out


@pytest.mark.parametrize(
    ("optimizer", "micro_batch", "chunks"),
    [("sgd", 100, [100, 100, 56]), ("momentum", None, [256])],
)
def test_full_batch_is_exact_gradient_descent_on_the_whole_set(
    binary, optimizer, micro_batch, chunks
):
    model = _tiny_linear()
    w0 = first_conv(model).weight.detach().clone()
    steps_taken: list[int] = []
    images_seen: list[int] = []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps_taken.append(1))
    forward = model.register_forward_pre_hook(
        lambda mod, inp: images_seen.append(inp[0].shape[0]) if mod.training else None
    )
    cfg = TrainConfig(steps=6, batch_size=None, optimizer=optimizer, lr=0.005, loss="mse",
                      snapshot_every=1, micro_batch=micro_batch)  # fmt: skip
    try:
        result = train(model, binary, cfg)
    finally:
        hook.remove()
        forward.remove()
    assert len(steps_taken) == 6 and result.batch_size == 256
    assert images_seen == chunks * 6  # every step sees the whole training set
    expected = _gradient_descent(binary.x_train, binary.y_train, w0, 0.005, 6,
                                 momentum=0.9 if optimizer == "momentum" else 0.0)  # fmt: skip
    assert result.steps.tolist() == list(range(7))
    for step in range(1, 7):
        moved, moved_expected = result.snapshots[step] - w0.numpy(), expected[step] - expected[0]
        error = np.abs(moved - moved_expected).max() / np.abs(moved_expected).max()
        assert error < 1e-4, (step, error)  # fp32 rounding only
    assert result.metrics["epoch"].tolist() == list(range(7))  # one epoch per full-batch step


def test_binary_target_needs_mse_and_a_scalar_model(binary, data):
    with pytest.raises(UserError, match="mse"):
        train(_tiny_linear(), binary, TrainConfig(steps=1, loss="ce"))
    with pytest.raises(UserError, match="4 outputs but the binary target needs 1"):
        train(_tiny_linear(num_classes=4), binary, TrainConfig(steps=1, loss="mse"))
    with pytest.raises(UserError, match="1 outputs but the class target needs 4"):
        train(_tiny_linear(), data, TrainConfig(steps=1))


def test_binary_accuracy_is_the_sign(binary):
    model = _tiny_linear()
    with torch.no_grad():
        expected = float(((model(binary.x_test) >= 0) == (binary.y_test > 0)).double().mean())
    result = train(model, binary, TrainConfig(steps=1, loss="mse", lr=1e-9))
    assert result.metrics["test_acc"][0] == pytest.approx(expected)


def test_divergence_is_reported_as_a_user_error(binary):
    cfg = TrainConfig(steps=40, batch_size=None, lr=1e4, loss="mse", eval_every=0)
    with pytest.raises(UserError, match="diverged"):
        train(_tiny_linear(), binary, cfg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of epochs and steps"),
        ({"epochs": 1, "steps": 1}, "exactly one of epochs and steps"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": 1, "optimizer": "rmsprop"}, "unknown optimizer"),
        ({"steps": 1, "loss": "l1"}, "unknown loss"),
        ({"steps": 1, "device": "tpu"}, "unknown device"),
        ({"steps": 1, "lr": 0}, "lr must be positive"),
        ({"steps": 1, "snapshot_every": -1}, "snapshot_every"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_a_user_error(binary):
    with pytest.raises(UserError, match="no CUDA GPU"):
        train(_tiny_linear(), binary, TrainConfig(steps=1, loss="mse", device="cuda"))


def test_bf16_autocast_path_trains_on_the_cpu_too(data):
    """The autocast branch the GPU takes by default, forced on the CPU so CI exercises
    it: the model learns, the snapshots come back in float32, and the first layer's
    weights stay float32 (autocast casts activations, never parameters)."""
    model = build_model("vgg11_bn", num_classes=4, width=0.25, seed=0)
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=0.001, eval_every=2,
                      device="cpu", amp=True, snapshot_every=10)  # fmt: skip
    result = train(model, data, cfg)
    assert result.amp and result.device == "cpu"
    assert result.snapshots.dtype == np.float32 and np.all(np.isfinite(result.snapshots))
    assert first_conv(model).weight.dtype == torch.float32
    assert result.metrics["train_loss"][-1] < 0.3 * result.metrics["train_loss"][0]
    assert result.metrics["test_acc"][-1] >= 0.8  # fp32 reaches 0.96 here, bf16 0.97


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_with_amp_and_channels_last(data, binary):
    model = build_model("vgg11_bn", num_classes=4, width=0.25, seed=0)
    cfg = TrainConfig(epochs=6, batch_size=32, optimizer="adam", lr=0.003, eval_every=2,
                      device="cuda", snapshot_every=10)  # fmt: skip
    result = train(model, data, cfg)
    assert result.device.startswith("cuda") and result.amp and result.channels_last
    assert first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)
    assert result.steps.tolist() == [0, 10, 20, 30, 40, 48]
    assert result.metrics["train_loss"][-1] < 0.5 * result.metrics["train_loss"][0]
    assert result.metrics["test_acc"][-1] >= 0.6
    # The linear CNN on CUDA: no autocast, TF32 off: the same full-batch GD as on the CPU.
    runs = []
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(steps=5, batch_size=None, lr=0.05, loss="mse", device=device,
                          snapshot_every=1)  # fmt: skip
        runs.append(train(_tiny_linear(), binary, cfg))
    assert not runs[1].amp and not runs[1].channels_last
    np.testing.assert_allclose(runs[1].snapshots, runs[0].snapshots, rtol=1e-4, atol=1e-6)
