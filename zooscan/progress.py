"""Progress bars (tqdm on stderr) for long work: scans and basis computation."""

from __future__ import annotations

import sys

from tqdm import tqdm

from zooscan.records import ModelRef


class ScanProgress:
    """A bar over the models of a scan with rate and ETA, plus a bar per basis computed."""

    def __init__(self, total: int, *, enabled: bool = True):
        self.enabled = enabled and total > 0
        self.total = total
        self.failed = 0
        self._bar: tqdm | None = None

    def __enter__(self) -> ScanProgress:
        if self.enabled:
            self._bar = tqdm(
                total=self.total,
                unit="model",
                desc="scan",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def model_done(self, ref: ModelRef, outcome: str) -> None:
        """Advance by one model (``outcome`` is ``stored`` or ``failed``)."""
        if outcome == "failed":
            self.failed += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{ref.name[-30:]} failed={self.failed}", refresh=False)
            self._bar.update(1)

    def basis(self, shape_key: tuple[int, int, int]) -> BasisBar | None:
        """A callback counting images for the basis of ``shape_key`` (None when disabled)."""
        if not self.enabled:
            return None
        label = "x".join(map(str, shape_key))
        return BasisBar(
            tqdm(
                unit="img", desc=f"basis {label}", file=sys.stderr, leave=False, dynamic_ncols=True
            )
        )


class BasisBar:
    """Counts the images of one basis computation; ``close()`` when it is done."""

    def __init__(self, bar: tqdm):
        self._bar = bar

    def __call__(self, images: int) -> None:
        self._bar.update(images)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()
