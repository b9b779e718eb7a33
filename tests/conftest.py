"""Shared fixtures: real photographs (from scikit-image's wheel), isolated plugin state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "motorcycle_left", "retina")


def _photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photographs as float32 ``(H, W, 3)`` arrays in ``[0, 1]``."""
    from PIL import Image

    out = {}
    for name in PHOTO_NAMES:
        matches = sorted(_photo_dir().glob(f"{name}.*"))
        if matches:
            img = np.asarray(Image.open(matches[0]).convert("RGB"), dtype=np.float32) / 255.0
            out[name] = img
    assert len(out) >= 4, "scikit-image's sample photographs are missing"
    return out


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory, photos) -> Path:
    """A folder of real photographs (PNG and JPEG, one grayscale, one in a subfolder),
    downscaled so patch statistics are quick to compute."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, (name, img) in enumerate(photos.items()):
        pil = Image.fromarray((img * 255).astype(np.uint8)).resize((96, 96))
        if i == 0:
            pil.convert("L").save(root / f"{name}_gray.png")
        elif i % 2:
            pil.save(root / "sub" / f"{name}.jpg", quality=95)
        else:
            pil.save(root / f"{name}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """Each test starts with a fresh plugin manager."""
    from zooscan import plugins

    plugins.reset()
    yield
    plugins.reset()
