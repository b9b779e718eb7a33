"""Offline identification coverage of the ``hf`` (transformers) source.

For every transformers model type that is an image model, the ``hf`` source's own path
is run on a default configuration, without any weights or network:

1. ``parse_config({"model_type": T, "architectures": [A]})``: the config class of the
   type with its defaults (``A`` is the checkpoint class below; :data:`CONFIG_EXTRAS`
   adds what a hub config always holds for the two timm types);
2. :func:`zooscan_builtins.hf_source.locate_first_layer`: the vision tower / base model
   / architecture class built on the ``meta`` device, first layer found;
3. the layer's kernel materialised from zero tensors of the meta parameters' shapes
   (:meth:`LayerSpec.materialize`: patch embeddings mapped onto image pixels...);
4. the checkpoint keys: the class a hub checkpoint of that type is saved from (the
   image-classification head class, or the full model class for zero-shot and feature
   models: ``CLIPModel``, ``ViTModel``...) is built on meta too, and its state-dict keys
   must give exactly one checkpoint key per first-layer tensor
   (:func:`zooscan_builtins.hf_source.match_checkpoint_keys`, with transformers' own
   key renaming), of the meta parameter's shape.

Model types come from transformers' ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``
(pipeline tag ``image-classification``), ``MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES``
(multimodal: scanned through the vision tower) and ``MODEL_FOR_IMAGE_MAPPING_NAMES``
(``image-feature-extraction``). Prints the share found per group and the failures by
reason.

    .venv/bin/python benchmarks/bench_hf_coverage.py [--json out.json] [MODEL_TYPE...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPS = (
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("zero-shot-image-classification", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("image-feature-extraction", "MODEL_FOR_IMAGE_MAPPING_NAMES"),
)


CONFIG_EXTRAS = {
    # configs that have no usable default: what a hub repo's config.json holds
    "timm_wrapper": {"architecture": "resnet50", "num_classes": 1000, "pretrained_cfg": {}},
    "timm_backbone": {"backbone": "resnet50"},
}


def model_types() -> dict[str, tuple[str, str]]:
    """``model_type -> (group, checkpoint class name)``; the first group a type is in wins."""
    from transformers.models.auto import modeling_auto as ma

    out: dict[str, tuple[str, str]] = {}
    for group, mapping_name in GROUPS:
        for model_type, classes in getattr(ma, mapping_name).items():
            cls = classes[0] if isinstance(classes, (list, tuple)) else classes
            out.setdefault(model_type, (group, cls))
    return out


def _reason(exc: BaseException, model_type: str) -> str:
    """A short failure class for grouping: error type + the message (model type elided)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    head = text.split(": ", 1)[1] if ": " in text else text
    for name in sorted({model_type, *re.findall(r"\b\w+_vision_model\b", head)}, key=len)[::-1]:
        head = head.replace(name, "<type>")
    return f"{type(exc).__name__}: {head[:110]}"


def check_type(model_type: str, checkpoint_class: str) -> dict[str, Any]:
    """Run steps 1-4 of the module docstring for one model type."""
    import torch

    from zooscan.layers import build_on_meta
    from zooscan_builtins import hf_source as hf

    start = time.perf_counter()
    row: dict[str, Any] = {"model_type": model_type, "checkpoint_class": checkpoint_class}
    try:
        with warnings.catch_warnings(), hf._quiet_transformers():
            warnings.simplefilter("ignore")
            config_dict = {"model_type": model_type, "architectures": [checkpoint_class]}
            config = hf.parse_config(config_dict | CONFIG_EXTRAS.get(model_type, {}), model_type)
            found = hf.locate_first_layer(config, None, model_type)
            state = found.model.state_dict()
            names = found.spec.parameter_names
            zeros = {n: torch.zeros(state[n].shape) for n in names}
            kernel, _ = found.spec.materialize(zeros)
            cls = hf.transformers_model_class(checkpoint_class)
            if cls is None:
                raise LookupError(f"transformers has no class {checkpoint_class}")
            vision = getattr(config, "vision_config", None)
            own = vision if type(vision) is getattr(cls, "config_class", None) else config
            with hf._BUILD_LOCK:
                saved = build_on_meta(lambda: cls(own))
            saved_state = saved.state_dict()
            mapping = hf.match_checkpoint_keys(
                names, list(saved_state), hf.conversion_renamer(found.model), model_type
            )
            for meta_key, ckpt_key in mapping.items():
                if tuple(saved_state[ckpt_key].shape) != tuple(state[meta_key].shape):
                    raise ValueError(f"shape of {ckpt_key} differs from {meta_key}")
        row.update(
            ok=True,
            built=type(found.model).__name__,
            via=found.candidate.what,
            module=found.spec.module,
            kind=found.spec.kind,
            kernel=list(kernel.shape),
            stride=list(found.spec.stride),
            checkpoint_keys=mapping,
        )
    except Exception as exc:  # every failure is a data point
        row.update(ok=False, reason=_reason(exc, model_type), message=str(exc)[:400])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="only these model types")
    parser.add_argument("--json", help="write every row to this file")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(1)
    started = time.perf_counter()
    types = model_types()
    if args.types:
        types = {t: v for t, v in types.items() if t in args.types}
    rows = []
    for model_type, (group, cls) in sorted(types.items()):
        row = check_type(model_type, cls) | {"group": group}
        rows.append(row)
        status = "ok  " if row["ok"] else "FAIL"
        detail = (
            f"{row['built']}.{row['module']} {row['kind']} {row['kernel']} via {row['via']}"
            if row["ok"]
            else row["reason"]
        )
        print(f"{status} {model_type:28s} {row['seconds']:6.2f}s  {detail}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"\ntransformers {transformers.__version__}, {len(rows)} model types, {elapsed:.1f} s")
    for group, _ in GROUPS:
        part = [r for r in rows if r["group"] == group]
        if part:
            ok = sum(r["ok"] for r in part)
            print(f"  {group:32s} {ok}/{len(part)} found ({100 * ok / len(part):.1f}%)")
    ok = sum(r["ok"] for r in rows)
    if rows:
        print(f"  {'all':32s} {ok}/{len(rows)} found ({100 * ok / len(rows):.1f}%)")
    video = [r for r in rows if not r["ok"] and "video model" in r["reason"]]
    if video:
        images = len(rows) - len(video)
        print(
            f"  {'image models (no video types)':32s} {ok}/{images} found "
            f"({100 * ok / images:.1f}%; {len(video)} video types are unsupported by design)"
        )
    reasons = collections.Counter(r["reason"] for r in rows if not r["ok"])
    if reasons:
        print("\nfailures by reason:")
        for reason, count in reasons.most_common():
            names = ", ".join(r["model_type"] for r in rows if r.get("reason") == reason)
            print(f"  {count:3d}  {reason}\n       {names}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
