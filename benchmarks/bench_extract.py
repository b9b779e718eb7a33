"""First-layer extraction from a cached torchvision checkpoint: zooscan vs the paper.

zooscan builds the architecture on the ``meta`` device, finds the first layer and
reads only its tensor from the checkpoint (``torch.load(mmap=True,
weights_only=True)``). The paper's code instantiates the full model, loads the whole
state dict and takes the layer. Both run on the same checkpoint: random weights saved
once, in torchvision's format, into a temporary ``TORCH_HOME`` cache (deleted at the
end). Each measurement runs in a fresh process, its resident memory sampled while it
runs (the peak above the process's size before the call is reported); the file
is in the page cache for both (it was just written), so the times compare CPU and
memory work, not disk speed.

Run: ``.venv/bin/python benchmarks/bench_extract.py [--models vit_l_16 resnet50] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_MODELS = ("vit_l_16", "resnet50")


def _write_checkpoint(builder_name: str) -> Path:
    """Save a randomly initialised model's state dict where torchvision caches it."""
    import torch
    from torchvision.models import get_model_builder, get_model_weights

    from zooscan_builtins.torchvision_source import cache_path

    path = cache_path(get_model_weights(builder_name).DEFAULT.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(get_model_builder(builder_name)(weights=None).state_dict(), path)
    return path


def _zooscan(builder_name: str):
    from zooscan.plugins import get_source
    from zooscan.records import ModelRef

    source = get_source("torchvision", {})
    return source.load_first_layer(ModelRef("torchvision", builder_name)).weight


def _paper(builder_name: str):
    """Instantiate the full model, load the whole state dict, take the first layer."""
    import torch
    from torchvision.models import get_model_builder, get_model_weights

    from zooscan_builtins.torchvision_source import build_kwargs, cache_path

    weights = get_model_weights(builder_name).DEFAULT
    model = get_model_builder(builder_name)(weights=None, **build_kwargs(builder_name, weights))
    model.load_state_dict(
        torch.load(cache_path(weights.url), map_location="cpu", weights_only=True)
    )
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return first.weight.detach().numpy().copy()


METHODS = {"zooscan": _zooscan, "paper": _paper}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakRss:
    """Samples this process's resident memory every 2 ms while active."""

    def __init__(self) -> None:
        self.peak = self.start = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _measure(method: str, builder_name: str, torch_home: str, queue) -> None:
    """Child process: import everything, then time one extraction and its peak extra
    resident memory (file pages it touches included)."""
    os.environ["TORCH_HOME"] = torch_home
    import torch  # noqa: F401  (imports are not part of the measurement)
    import torchvision  # noqa: F401

    import zooscan_builtins.torchvision_source  # noqa: F401

    with _PeakRss() as rss:
        started = time.perf_counter()
        weight = METHODS[method](builder_name)
        seconds = time.perf_counter() - started
    queue.put((seconds, rss.peak - rss.start, weight))


def _run(method: str, builder_name: str, torch_home: str):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_measure, args=(method, builder_name, torch_home, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="zooscan-bench-") as home:
        os.environ["TORCH_HOME"] = home
        print(f"{'model':10s} {'file MB':>8s} {'method':8s} {'median s':>9s} {'extra RSS MB':>12s}")
        for name in args.models:
            path = _write_checkpoint(name)
            size_mb = path.stat().st_size / 2**20
            results = {}
            for method in METHODS:
                runs = [_run(method, name, home) for _ in range(args.repeats)]
                seconds = statistics.median(r[0] for r in runs)
                peak = max(r[1] for r in runs)
                results[method] = (seconds, runs[0][2])
                print(f"{name:10s} {size_mb:8.1f} {method:8s} {seconds:9.3f} {peak:12.1f}")
            same = np.array_equal(results["zooscan"][1], results["paper"][1])
            ratio = results["paper"][0] / results["zooscan"][0]
            print(f"{name:10s} paper/zooscan time ratio: {ratio:.1f}x  (identical weight: {same})")
            path.unlink()


if __name__ == "__main__":
    main()
