"""Offline identification coverage of the ``timm`` source.

For every tag of ``timm.list_models(pretrained=True)``: is its first layer found on the
``meta`` device, does it agree with timm's ``first_conv``, and can its kernel be
materialised (:func:`zooscan_builtins.timm_source.identify`)? Tags sharing an
architecture and input size share the architecture, so each such group is built once
(its first tag) and every tag's own ``first_conv`` is checked against the layer found.
A second check runs each model's ``checkpoint_filter_fn`` on meta placeholders of a
timm-format state dict (what the ``timm/`` hub repos hold): the first-layer keys must
map onto themselves.

Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set so that any attempt fails fast).

    .venv/bin/python benchmarks/bench_timm_coverage.py [--workers 2] [--json out.json] [PATTERN...]
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import multiprocessing
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _groups(patterns: list[str]) -> dict[tuple, list[str]]:
    import timm
    from timm.models import get_pretrained_cfg

    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for tag in sorted(timm.list_models(pretrained=True)):
        if patterns and not any(fnmatch.fnmatchcase(tag, p) for p in patterns):
            continue
        cfg = get_pretrained_cfg(tag)
        groups[(cfg.architecture, tuple(cfg.input_size))].append(tag)
    return groups


def _reason(exc: BaseException) -> str:
    """A short failure class for grouping: error type + the message up to a colon."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    head = text.split(":")[0][:90]
    return f"{type(exc).__name__}: {head}"


def _check_group(tags: list[str]) -> list[dict[str, Any]]:
    """Identify the group's first tag, then check every tag's first_conv against it."""
    import torch

    from zooscan_builtins import timm_source as ts

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        ident = ts.identify(tags[0])
    except Exception as exc:  # record and go on: the benchmark counts failures
        seconds = time.perf_counter() - start
        return [
            {"tag": t, "ok": False, "reason": _reason(exc), "message": str(exc)[:400],
             "seconds": seconds if i == 0 else 0.0}
            for i, t in enumerate(tags)
        ]  # fmt: skip
    seconds = time.perf_counter() - start
    filter_ok, filter_message = _filter_check(ts, ident)
    rows = []
    for i, tag in enumerate(tags):
        row = {
            "tag": tag,
            "ok": True,
            "module": ident.spec.module,
            "kind": ident.spec.kind,
            "kernel": list(ident.spec.kernel_size),
            "stride": list(ident.spec.stride),
            "flags": sorted(ident.spec.flags),
            "first_conv_check": ident.first_conv_check,
            "filter": getattr(ident.filter_fn, "__name__", None) if ident.filter_fn else None,
            "filter_ok": filter_ok,
            "filter_message": filter_message,
            "seconds": seconds if i == 0 else 0.0,
        }
        if i:
            try:
                declared = ts._first_conv_tuple(ts.pretrained_cfg(tag).get("first_conv"))
                row["first_conv_check"] = ts.check_first_conv(ident.spec, declared, ident.model)
            except Exception as exc:
                row.update(ok=False, reason=_reason(exc), message=str(exc)[:400])
        rows.append(row)
    return rows


def _filter_check(ts, ident) -> tuple[bool, str]:
    """A timm-format checkpoint (the meta model's own keys and shapes) must map each
    first-layer parameter onto its own key through the checkpoint filter."""
    state = ident.model.state_dict()
    index = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
    try:
        mapping = ts.map_checkpoint_keys(ident, index)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:300]}"
    wrong = {n: k for n, k in mapping.items() if n != k}
    if wrong:
        return False, f"maps {wrong}"
    if ident.filter_fn is not None and ts.filtered_sources(ident, index) is None:
        return True, "filter needs values; plain key match used"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="fnmatch patterns on tags (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write every tag's result to this file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    groups = _groups(args.patterns)
    work = sorted(groups.values(), key=len, reverse=True)
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, args.workers), maxtasksperchild=100) as pool:
        for i, group_rows in enumerate(pool.imap_unordered(_check_group, work, chunksize=4)):
            rows.extend(group_rows)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(work)} architectures", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    _report(rows, len(work), elapsed)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(sorted(rows, key=lambda r: r["tag"]), fh, indent=1)
    return 0


def _report(rows: list[dict[str, Any]], n_groups: int, elapsed: float) -> None:
    ok = [r for r in rows if r["ok"]]
    failed = [r for r in rows if not r["ok"]]
    share = 100.0 * len(ok) / max(1, len(rows))
    print(f"timm tags: {len(rows)} ({n_groups} architecture/input-size groups built on meta)")
    print(f"first layer found, agrees with first_conv, materialisable: {len(ok)} = {share:.2f}%")
    build = sorted((r["seconds"] for r in rows if r["seconds"]), reverse=True)
    if build:
        print(f"build+find per group: median {build[len(build) // 2]:.2f}s, max {build[0]:.2f}s")
    print(f"wall time: {elapsed:.0f}s")
    kinds = collections.Counter(r["kind"] for r in ok)
    print("layer kinds: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    flags = collections.Counter(f for r in ok for f in r["flags"])
    print("flags: " + ", ".join(f"{k} {v}" for k, v in flags.most_common()))
    notes = collections.Counter(
        r["first_conv_check"] for r in ok if r["first_conv_check"] != "agrees"
    )
    for note, count in notes.most_common():
        print(f"  first_conv note ({count}): {note}")
    filter_bad = [r for r in ok if not r["filter_ok"]]
    print(f"checkpoint-filter check (timm-format keys map onto themselves): "
          f"{len(ok) - len(filter_bad)}/{len(ok)} ok")  # fmt: skip
    for r in filter_bad:
        print(f"  filter: {r['tag']}: {r['filter_message']}")
    if failed:
        print(f"failures by reason ({len(failed)} tags):")
        by_reason = collections.defaultdict(list)
        for r in failed:
            by_reason[r["reason"]].append(r)
        for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            print(f"  [{len(items)}] {reason}")
            print(f"      e.g. {items[0]['tag']}: {items[0]['message'][:300]}")
            print(f"      tags: {', '.join(r['tag'] for r in items[:12])}"
                  + (" ..." if len(items) > 12 else ""))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
