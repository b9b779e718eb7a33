"""An example third-party zooscan plugin: a model source of Gabor filter banks.

It is what a user writes to add a source: one module, one entry point in the
``zooscan`` group (see pyproject.toml beside this file), hooks marked with
``zooscan.hookimpl``. Each "model" is a bank of oriented Gabor filters, the kind of
first layer trained CNNs are famous for, at a chosen kernel size.
"""

from __future__ import annotations

import fnmatch
import hashlib

import click
import numpy as np

from zooscan import hookimpl
from zooscan.errors import ModelError
from zooscan.records import FirstLayer, ModelRef, Provenance, check_options

BANKS = {f"gabor-{k}x{k}-{w}": (k, w) for k in (3, 5, 7, 11) for w in ("low", "high")}
BANKS["gabor-broken"] = (0, "low")


def gabor_bank(size: int, band: str, n_orient: int = 8) -> np.ndarray:
    """``(2 * n_orient, 3, size, size)`` float32: even and odd Gabors on luminance."""
    wavelength = size / (1.5 if band == "high" else 0.75)
    sigma = size / 4
    ax = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    filters = []
    for i in range(n_orient):
        theta = np.pi * i / n_orient
        rot = xx * np.cos(theta) + yy * np.sin(theta)
        envelope = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        for phase in (0.0, np.pi / 2):
            g = envelope * np.cos(2 * np.pi * rot / wavelength + phase)
            filters.append(np.stack([g - g.mean()] * 3))
    return np.asarray(filters, dtype=np.float32)


class GaborSource:
    """Gabor filter banks as if they were models."""

    name = "gabor"
    description = "Example plugin: Gabor filter banks (3x3 to 11x11)"

    def __init__(self, options: dict[str, str]):
        check_options("gabor source", options, {"orientations": "filters per bank / 2"})
        self.orientations = int(options.get("orientations", 8))

    def list_models(self, patterns):
        for name, (size, band) in BANKS.items():
            if not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns):
                yield ModelRef(self.name, name, {"kernel": size, "band": band})

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        size, band = BANKS[ref.name]
        if size == 0:
            raise ModelError("this bank is broken on purpose (tests the failure path)")
        weight = gabor_bank(size, band, self.orientations)
        return FirstLayer(
            weight=weight,
            module="gabor",
            stride=(1, 1),
            padding=(size // 2, size // 2),
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            channel_order="RGB",
            provenance=Provenance(
                repo="zooscan-example-gabor",
                file=ref.name,
                sha256=hashlib.sha256(weight.tobytes()).hexdigest(),
            ),
            metadata={"band": band},
        )


@hookimpl
def register_sources(register):
    register(GaborSource)


@hookimpl
def register_commands(cli):
    @cli.command("gabor-info")
    @click.argument("size", type=int)
    def gabor_info(size: int) -> None:
        """Print the shape of a Gabor bank (example plugin command)."""
        click.echo(f"gabor bank {size}x{size}: {gabor_bank(size, 'low').shape}")
