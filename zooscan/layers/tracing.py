"""Steps 1 and 2 of the search: trace the dummy forward.

The :class:`Tracer` labels every tensor (derived from the image without parameters,
tainted by a learned parameter, or parametric) and records, through module hooks, the
first layer consuming a derived tensor and the further branches consuming that same
tensor. Hooks raise :class:`Abort` to stop the forward once that is known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from zooscan.errors import FirstLayerNotFound, UnsupportedModel


class Abort(BaseException):
    """Raised from a hook to stop the forward once the first layer is known."""


class Stop(BaseException):
    """Raised from a hook to stop the forward with a user-facing error."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Status(enum.Enum):
    DERIVED = "derived"  # parameter-free function of the image
    TAINTED = "tainted"  # depends on the image through a learned parameter
    PARAMETRIC = "parametric"  # depends on parameters only


@dataclass(frozen=True)
class _Tag:
    """What a tensor is in terms of the branches (tracked once the first layer is found)."""

    kind: str  # "single" | "sum" | "cat"
    branches: tuple[int, ...]
    linear: bool  # a linear combination of raw branch outputs and their BatchNorms
    bn_applied: bool = False  # "single": its BatchNorm has been applied
    folded: tuple[int, ...] = ()  # "sum": the branches summed after their BatchNorm

    @property
    def normalized(self) -> tuple[int, ...]:
        """The branches this tensor contains with their BatchNorm applied."""
        if self.kind == "single":
            return self.branches if self.bn_applied else ()
        return self.folded


@dataclass
class Hit:
    """One traced module consuming the image: a first-layer branch."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "linear" | "identity"
    input_shape: tuple[int, ...]
    call: dict[str, Any] | None = None  # the functional conv2d/linear call seen inside
    std_eps: float | None = None  # eps of a batch_norm applied to the weight inside
    std_scaled: bool = False
    bn: str | None = None
    bn_module: nn.Module | None = None


_LINEAR_KEEP = {"contiguous", "clone", "dropout", "dropout2d", "alpha_dropout", "float", "to"}
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__"}
_CAT = {"cat", "concat", "concatenate"}
_INPLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__"}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_BATCH_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor among a call's arguments (``None`` if there is none)."""
    for item in (*args, *kwargs.values()):
        if isinstance(item, torch.Tensor):
            return item
    return None


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _layer_kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


class Tracer(TorchFunctionMode):
    """Labels tensors during the dummy forward and records the first-layer branches."""

    def __init__(self, model: nn.Module, image: torch.Tensor):
        super().__init__()
        self.model = model
        self.image = image
        self.status: dict[int, _Status] = {id(p): _Status.PARAMETRIC for p in model.parameters()}
        self.status[id(image)] = _Status.DERIVED
        # tensors whose values depend on meta buffers: the CPU probe cannot replay them
        self.valueless: set[int] = {id(b) for b in model.buffers() if b.device.type == "meta"}
        self.keep: list[torch.Tensor] = [image]  # keeps ids unique while tracing
        self.stack: list[str] = []
        self.first_break: str | None = None
        self.source: torch.Tensor | None = None
        self.hits: list[Hit] = []
        self.hit_index: dict[str, int] = {}
        self.raw_out: dict[int, int] = {}
        self.tags: dict[int, _Tag] = {}
        self.combos: list[_Tag] = []
        self.other_consumers: list[str] = []
        self.early_bns: list[tuple[str, nn.Module, torch.Tensor, list[torch.Tensor]]] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------- hooks

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Install the module hooks (removed on exit)."""
        try:
            for name, module in self.model.named_modules():
                pre = functools.partial(self._pre_hook, name)
                post = functools.partial(self._post_hook, name)
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(post))
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _pre_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append(name)
        inp = first_tensor(args, kwargs)
        if inp is None:
            return
        if isinstance(module, (nn.Linear, _ConvNd)):
            self._on_consumer(name, module, inp)
        elif isinstance(module, _BatchNorm) and _has_running_stats(module):
            if self.hits:
                self._on_batchnorm(name, module, inp)
            elif self.status.get(id(inp)) is _Status.DERIVED:
                self.early_bns.append((name, module, inp, []))

    def _post_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        if not isinstance(output, torch.Tensor):
            return
        index = self.hit_index.get(name)
        if index is not None:
            self._tag_output(index, output)
        elif not self.hits:
            for bn_name, _, _, outputs in self.early_bns:
                if bn_name == name:
                    outputs.append(output)

    def _tag_output(self, index: int, output: torch.Tensor) -> None:
        self.raw_out[id(output)] = index
        self.tags[id(output)] = _Tag("single", (index,), True, self.hits[index].kind == "identity")
        self.keep.append(output)

    def _on_consumer(self, name: str, module: nn.Module, inp: torch.Tensor) -> None:
        if self.source is None:
            status = self.status.get(id(inp))
            if status is _Status.DERIVED:
                if not _is_layer(module):
                    raise Stop(
                        UnsupportedModel(
                            f"the first layer '{name}' is a {type(module).__name__}: zooscan "
                            "analyses 2-D convolutions and linear patch embeddings (3-D, 1-D "
                            "and transposed convolutions are not 2-D first layers)"
                        )
                    )
                self.source = inp
                self._add_hit(name, module, inp, _layer_kind(module))
                self._adopt_early_batchnorms()
            elif status is _Status.TAINTED:
                raise Stop(
                    FirstLayerNotFound(
                        f"the image reaches '{name}' ({type(module).__name__}) only through "
                        f"{self.first_break or 'a layer with learned parameters'}; no "
                        "convolution or linear layer is applied to the image itself"
                    )
                )
            return
        if inp is self.source and _is_layer(module):
            self._add_hit(name, module, inp, _layer_kind(module))
            return
        if self.status.get(id(inp)) is _Status.DERIVED:
            self.other_consumers.append(name)  # reads another transform of the image
        raise Abort

    def _adopt_early_batchnorms(self) -> None:
        """BatchNorms that ran on the image before the first conv are identity branches."""
        for name, module, inp, outputs in self.early_bns:
            if inp is self.source and outputs:
                self._add_hit(name, module, inp, "identity")
                self._tag_output(self.hit_index[name], outputs[0])

    def _on_batchnorm(self, name: str, module: nn.Module, inp: torch.Tensor) -> None:
        """A BatchNorm (with running statistics) seen once the first layer is known."""
        if inp is self.source:
            self._add_hit(name, module, inp, "identity")
            return
        index = self.raw_out.get(id(inp))
        if index is not None and self.hits[index].bn is None:
            self.hits[index].bn, self.hits[index].bn_module = name, module

    def _add_hit(self, name: str, module: nn.Module, inp: torch.Tensor, kind: str) -> Hit:
        """Record a consumer; an identity branch is its own BatchNorm."""
        hit = Hit(name=name, module=module, kind=kind, input_shape=tuple(inp.shape))
        if kind == "identity":
            hit.bn, hit.bn_module = name, module
        self.hit_index[name] = len(self.hits)
        self.hits.append(hit)
        return hit

    # ----------------------------------------------------------- functions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = list(_tensors((args, kwargs)))
        if not inputs:
            return
        name = getattr(func, "__name__", "") or ""
        outputs = list(_tensors(out))
        inplace = name in _INPLACE or (name.endswith("_") and not name.startswith("_"))
        if inplace and args and isinstance(args[0], torch.Tensor):
            outputs.append(args[0])
        if not outputs:
            return
        status = self._status_of(inputs, name)
        if self.valueless and any(id(t) in self.valueless for t in inputs):
            self.valueless.update(id(t) for t in outputs)
            self.keep.extend(outputs)
        for t in outputs:
            if status is None:
                self.status.pop(id(t), None)
            else:
                self.status[id(t)] = status
                self.keep.append(t)
        if self.hits:
            self._observe_inside(name, args, kwargs)
            if self.tags:
                self._propagate(name, args, kwargs, inputs, outputs)

    def _status_of(self, inputs: list[torch.Tensor], name: str) -> _Status | None:
        found = {self.status.get(id(t)) for t in inputs}
        derived = _Status.DERIVED in found
        if _Status.TAINTED in found or (derived and _Status.PARAMETRIC in found):
            if derived and not self.hits and self.first_break is None:
                where = self.stack[-1] if self.stack else ""
                self.first_break = f"'{name}' in module '{where or type(self.model).__name__}'"
            return _Status.TAINTED
        if derived:
            return _Status.DERIVED
        return _Status.PARAMETRIC if _Status.PARAMETRIC in found else None

    def _observe_inside(self, name: str, args: tuple, kwargs: dict) -> None:
        """Record the functional calls a first-layer module makes in its forward."""
        index = self.hit_index.get(self.stack[-1]) if self.stack else None
        if index is None:
            return
        hit = self.hits[index]
        if name in ("conv2d", "linear") and hit.call is None:
            values = dict(zip(_CONV_ARGS, _CONV_DEFAULTS, strict=True))
            values.update(zip(_CONV_ARGS, args, strict=False))
            values.update(kwargs)
            values["input_shape"] = tuple(values["input"].shape)
            values["weight_is_parameter"] = values["weight"] is getattr(hit.module, "weight", None)
            values.pop("input"), values.pop("weight"), values.pop("bias")
            hit.call = values
        elif name == "batch_norm" and args and hit.std_eps is None:
            self._observe_standardization(hit, args, kwargs)

    def _observe_standardization(self, hit: Hit, args: tuple, kwargs: dict) -> None:
        """A ``batch_norm`` over the weight inside the layer: weight standardisation."""
        if self.status.get(id(args[0])) is not _Status.PARAMETRIC:
            return
        values = {"eps": 1e-5, "weight": None}
        values.update(zip(_BATCH_NORM_ARGS, args[1:], strict=False))
        values.update(kwargs)
        hit.std_eps = float(values["eps"])
        hit.std_scaled = values["weight"] is not None

    def _propagate(self, name: str, args: tuple, kwargs: dict, inputs: list, outputs: list) -> None:
        tags = [self.tags.get(id(t)) for t in inputs]
        if not any(tags):
            return
        tag = self._combine(name, args, kwargs, inputs, tags)
        for t in outputs:
            self.tags[id(t)] = tag
            self.keep.append(t)
        if tag.kind in ("sum", "cat"):
            self.combos.append(tag)

    def _combine(self, name: str, args: tuple, kwargs: dict, inputs: list, tags: list) -> _Tag:
        first = next(t for t in tags if t is not None)
        if name in _CAT and len(inputs) == len(tags) and all(tags):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim in (1, -3) and all(t.kind == "single" for t in tags):
                order = tuple(t.branches[0] for t in tags)
                return _Tag("cat", order, all(t.linear for t in tags))
        if name in _ADD and kwargs.get("alpha", 1) == 1:
            if len(inputs) == 2 and all(tags):
                merged = tuple(sorted(set(tags[0].branches) | set(tags[1].branches)))
                folded = tuple(sorted(set(tags[0].normalized) | set(tags[1].normalized)))
                linear = all(t.linear and t.kind != "cat" for t in tags)
                return _Tag("sum", merged, linear, folded=folded)
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if len(inputs) == 1 and isinstance(other, (int, float)) and other == 0:
                return first
        if name in _LINEAR_KEEP and len(inputs) == 1:
            return first
        if name == "batch_norm" and first.kind == "single" and not first.bn_applied:
            hit = self.hits[first.branches[0]]
            if hit.bn is not None and self.stack and self.stack[-1] == hit.bn:
                return dataclasses.replace(first, bn_applied=True)
        return dataclasses.replace(first, linear=False)


def _has_running_stats(module: nn.Module) -> bool:
    return bool(module.track_running_stats) and module.running_var is not None
