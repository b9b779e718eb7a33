"""Benchmark: zooscan's streamed exact patch basis vs the paper's ``pca_lowrank``.

The paper's CIFAR notebooks (RheaChowers/CNNs-First-Layer) unfold *every* valid
stride-1 patch of 10 000 images into one float64 matrix (9 M x 27 for 3x3x3,
~1.9 GB) and call ``torch.pca_lowrank(X, q=d)`` (centered, randomised, singular
values ``S`` with ``S_i^2 = M * eigenvalue_i``). zooscan streams the images once,
accumulating the patch count, sum and sum of outer products in float64 (the
``rows`` method of :mod:`zooscan.patches`), then takes the exact ``eigh``.

Images: ``synthetic:n=N,size=32`` (the built-in dead-leaves generator, CIFAR-sized),
rendered once and shared through an ``.npy`` file. Each measurement runs in its own
process, so its peak memory (``VmHWM`` minus the resident size after loading the
images) is its own. The paper's matrix for 3x7x7 on 10 000 images would be 7.9 GB
(plus ``pca_lowrank``'s centered copy), so the paper's method runs on as many images
as fit in ``--paper-max-gb`` (both methods are then timed on that subset for the
ratios; zooscan also runs on all images).

Run: ``.venv/bin/python benchmarks/bench_basis.py [--images N] [--paper-max-gb G]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KERNELS = (3, 7)
SIZE = 32


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(method: str, kernel: int, count: int, path: str) -> dict:
    """Run one measurement in this process; return time, peak memory and the basis."""
    if count > 8:  # warm up libraries and allocators on a few images, untimed
        worker_run(method, kernel, path, 8)
    resident = _memory_kb("VmRSS")
    start = time.perf_counter()
    eigenvalues, components = worker_run(method, kernel, path, count)
    elapsed = time.perf_counter() - start
    peak_mb = (_memory_kb("VmHWM") - resident) / 1024
    return {
        "time": elapsed,
        "peak_mb": peak_mb,
        "eigenvalues": eigenvalues.tolist(),
        "components": components.tolist(),
    }


def read_images(path: str, first: int, count: int) -> np.ndarray:
    """Images ``first .. first + count`` of an ``.npy`` file, read (not memory-mapped)."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(handle)
        per_image = int(np.prod(shape[1:]))
        handle.seek(first * per_image * dtype.itemsize, 1)
        data = np.fromfile(handle, dtype=dtype, count=count * per_image)
    return data.reshape(-1, *shape[1:])


def worker_run(method: str, kernel: int, path: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The basis of the first ``count`` images by zooscan (``ours``) or the paper's way."""
    import torch
    import torch.nn.functional as F

    from zooscan.patches import PatchStats

    if method == "ours":  # a stream of 1000-image batches
        stats = PatchStats(3, kernel, kernel)
        for first in range(0, count, 1000):
            stats.update(read_images(path, first, min(1000, count - first)))
        basis = stats.to_basis("bench")
        eigenvalues, components = basis.eigenvalues, basis.components
    else:  # the whole dataset in memory, then the whole patch matrix
        x = torch.from_numpy(read_images(path, 0, count)).double()
        patches = F.unfold(x, kernel).transpose(1, 2).reshape(-1, 3 * kernel * kernel)
        d = patches.shape[1]
        _, singular, components_t = torch.pca_lowrank(patches, q=d)
        eigenvalues = (singular**2 / patches.shape[0]).numpy()
        components = components_t.numpy()
    return eigenvalues, components


def run_worker(method: str, kernel: int, count: int, path: Path) -> dict:
    args = [sys.executable, __file__, "--worker", method, str(kernel), str(count), str(path)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} {kernel}x{kernel} on {count} images failed:\n{out.stderr}")
    return json.loads(out.stdout)


def compare(ours: dict, paper: dict) -> tuple[float, float, float]:
    """Max eigenvalue difference (relative to the largest), and the max angle (degrees)
    between matching components: over all, and over non-degenerate ones (gap > 1 %)."""
    values_a, values_b = np.array(ours["eigenvalues"]), np.array(paper["eigenvalues"])
    a, b = np.array(ours["components"]), np.array(paper["components"])
    eig_diff = float(np.abs(values_a - values_b).max() / values_a[0])
    angles = np.degrees(np.arccos(np.clip(np.abs((a * b).sum(axis=0)), 0.0, 1.0)))
    neighbours = np.full((2, values_a.size), np.inf)
    neighbours[0, 1:] = np.abs(np.diff(values_a))
    neighbours[1, :-1] = np.abs(np.diff(values_a))
    separated = neighbours.min(axis=0) > 0.01 * values_a
    return eig_diff, float(angles.max()), float(angles[separated].max(initial=0.0))


def render(count: int, folder: Path) -> Path:
    from zooscan_builtins.image_datasets import SyntheticDataset

    dataset = SyntheticDataset(f"n={count},size={SIZE},seed=0")
    path = folder / "images.npy"
    np.save(path, np.concatenate(list(dataset.batches(3))))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images (default 10 000)")
    parser.add_argument(
        "--paper-max-gb",
        type=float,
        default=2.0,
        help="largest float64 patch matrix the paper's method may build (default 2 GB)",
    )
    options = parser.parse_args()
    print(
        f"patch basis: {options.images} synthetic {SIZE}x{SIZE} RGB images, valid stride-1 patches"
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = render(options.images, Path(tmp))
        print(f"(rendered the images in {time.perf_counter() - start:.1f} s)\n")
        header = f"{'kernel':>7} {'images':>7} {'method':<26} {'time s':>8} {'peak MB':>9}"
        print(header)
        print("-" * len(header))
        summaries = []
        for kernel in KERNELS:
            d = 3 * kernel * kernel
            per_image = (SIZE - kernel + 1) ** 2 * d * 8
            subset = min(options.images, int(options.paper_max_gb * 2**30 // per_image))
            paper = run_worker("paper", kernel, subset, path)
            ours = run_worker("ours", kernel, subset, path)
            label = f"3x{kernel}x{kernel}"
            for name, result in (
                ("paper (unfold+pca_lowrank)", paper),
                ("zooscan (streamed eigh)", ours),
            ):
                print(
                    f"{label:>7} {subset:>7} {name:<26} {result['time']:8.2f} {result['peak_mb']:9.0f}"
                )
            if subset < options.images:
                full = run_worker("ours", kernel, options.images, path)
                print(
                    f"{label:>7} {options.images:>7} {'zooscan (streamed eigh)':<26} "
                    f"{full['time']:8.2f} {full['peak_mb']:9.0f}"
                )
            eig_diff, angle_all, angle_separated = compare(ours, paper)
            summaries.append((label, subset, paper, ours, eig_diff, angle_all, angle_separated))
        print("\nratios paper / zooscan on the same images, and agreement of the two bases:")
        for label, subset, paper, ours, eig_diff, angle_all, angle_separated in summaries:
            print(
                f"  {label} ({subset} images): time x{paper['time'] / ours['time']:.1f}, "
                f"peak memory x{paper['peak_mb'] / max(ours['peak_mb'], 1.0):.0f}; "
                f"max |eigenvalue diff| / max = {eig_diff:.1e}; max angle {angle_all:.2g} deg "
                f"(all components), {angle_separated:.2g} deg (gaps > 1 %)"
            )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
    else:
        main()
