"""Run every hostile input through the real CLI and print what zooscan answered.

For the issue's closing note (reliability and security, "hostile and broken input"):
each hostile checkpoint of the test catalogue (``tests/test_hostile.py``: pickles that
would run code, broken safetensors, zip bombs, absurd shapes, NaN weights, non-4-D
layers...) is scanned on its own with ``zooscan scan --source files`` into a copy of a
store that already holds two models; then each broken store (a directory, a text file,
an empty file, another tool's HDF5, a truncated store, a newer schema, a missing
folder) is given to ``zooscan scan`` and ``zooscan ls``. Each row says what came back
(a recorded failure, a fatal error, or stored), the exit code, the one-line message,
whether the models already stored stayed byte-identical and whether any payload ran.

    .venv/bin/python benchmarks/report_hostile.py             # in-process CLI (fast)
    .venv/bin/python benchmarks/report_hostile.py --subprocess  # `python -m zooscan` each time
    .venv/bin/python benchmarks/report_hostile.py --format json

Offline, a minute or two on a laptop (``--subprocess``: a few seconds per input).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MESSAGE_WIDTH = 110


@dataclass
class Row:
    """One hostile input and what the CLI answered."""

    input: str
    kind: str
    command: str
    outcome: str
    exit_code: int
    message: str
    lines: int
    """Lines of the answer that carry the error (must be 1)."""
    store_untouched: bool
    payload_ran: bool
    seconds: float


def photo_folder(root: Path) -> Path:
    """A few of scikit-image's photographs, downscaled: the patch dataset of the scans."""
    import numpy as np
    import skimage
    from PIL import Image

    folder = root / "photos"
    folder.mkdir()
    data = Path(skimage.__file__).parent / "data"
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"):
        match = sorted(data.glob(f"{name}.*"))
        if match:
            image = Image.open(match[0]).convert("RGB").resize((96, 96))
            Image.fromarray(np.asarray(image)).save(folder / f"{name}.png")
    return folder


class Cli:
    """The real CLI, in this process (click's runner) or as ``python -m zooscan``."""

    def __init__(self, subprocess_mode: bool) -> None:
        self.subprocess_mode = subprocess_mode

    def __call__(self, args: Sequence[str], cwd: Path) -> tuple[int, str]:
        args = [str(a) for a in args]
        if self.subprocess_mode:
            proc = subprocess.run(
                [sys.executable, "-m", "zooscan", *args],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            return proc.returncode, proc.stdout + proc.stderr
        from click.testing import CliRunner

        from zooscan import plugins
        from zooscan.cli import build_cli

        plugins.reset()
        result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
        return result.exit_code, result.output


def base_store(cli: Cli, root: Path, dataset: str) -> Path:
    """A store holding two good models and their basis."""
    import torch
    from safetensors.numpy import save_file
    from test_hostile import weight

    good = root / "good"
    good.mkdir()
    save_file({"stem.weight": weight(1, (16, 3, 3, 3))}, str(good / "base_a.safetensors"))
    torch.save({"stem.weight": torch.from_numpy(weight(2))}, good / "base_b.pt")
    store = root / "base" / "zoo.h5"
    store.parent.mkdir()
    code, output = cli(["scan", "--source", "files", good, "--store", store, "-d", dataset], root)
    if code != 0:
        raise SystemExit(f"could not build the base store:\n{output}")
    return store


def checkpoint_rows(cli: Cli, root: Path, store: Path, dataset: str) -> list[Row]:
    """Each hostile checkpoint scanned on its own into a fresh copy of ``store``."""
    from test_hostile import HOSTILE, snapshot

    before = snapshot(store)
    rows = []
    for i, case in enumerate(HOSTILE):
        work = root / f"case{i:02d}"
        markers, zoo = work / "markers", work / "zoo"
        for folder in (markers, zoo):
            folder.mkdir(parents=True)
        case.write(zoo / case.file, markers)
        target = work / "store" / store.name
        shutil.copytree(store.parent, target.parent)
        args = ["scan", "--source", "files", zoo / case.file, "--store", target, "-d", dataset]
        started = time.monotonic()
        code, output = cli(args, work)
        seconds = time.monotonic() - started
        failed = [line for line in output.splitlines() if line.startswith(f"failed: {case.name}:")]
        after = snapshot(target)
        stored = (("files", case.name) in after) and not failed
        rows.append(
            Row(
                input=case.file,
                kind=case.kind,
                command="scan",
                outcome="stored" if stored else "recorded failure" if failed else "fatal",
                exit_code=code,
                message=(failed[0].split(": ", 2)[2] if failed else _error_line(output)).replace(
                    str(zoo / case.file), case.file
                ),
                lines=len(failed) if failed else len(_error_lines(output)),
                store_untouched={k: after.get(k) for k in before} == before,
                payload_ran=any(markers.iterdir()),
                seconds=seconds,
            )
        )
    return rows


def store_rows(cli: Cli, root: Path, store: Path, dataset: str) -> list[Row]:
    """Broken stores given to ``scan`` and ``ls``: one fatal line, nothing written."""
    import h5py
    import numpy as np
    from safetensors.numpy import save_file
    from test_hostile import weight

    def other_hdf5(path: Path) -> None:
        with h5py.File(path, "w") as h5:
            h5["data"] = np.arange(4)

    def newer(path: Path) -> None:
        shutil.copy(store, path)
        with h5py.File(path, "a") as h5:
            h5.attrs["schema_version"] = np.int64(99)

    makers = {
        "store is a directory": lambda p: (p / "inside").mkdir(parents=True),
        "store is a text file": lambda p: p.write_text("not an HDF5 file"),
        "store is an empty file": lambda p: p.write_bytes(b""),
        "store is another tool's HDF5": other_hdf5,
        "store truncated to half": lambda p: p.write_bytes(
            store.read_bytes()[: store.stat().st_size // 2]
        ),
        "store of schema version 99": newer,
        "store in a missing folder": lambda p: None,
    }
    checkpoint = root / "ok.safetensors"
    save_file({"stem.weight": weight(5)}, str(checkpoint))
    rows = []
    for i, (label, make) in enumerate(makers.items()):
        for command in ("scan", "ls"):
            folder = root / f"store{i}{command}"
            folder.mkdir()
            path = folder / ("missing" if "missing" in label else "") / "zoo.h5"
            make(path)
            listing = _listing(folder)
            args = (
                ["ls"]
                if command == "ls"
                else ["scan", "--source", "files", checkpoint, "-d", dataset]
            )
            started = time.monotonic()
            code, output = cli([*args, "--store", path], folder)
            rows.append(
                Row(
                    input=label,
                    kind="store",
                    command=command,
                    outcome="fatal" if code != 0 else "accepted",
                    exit_code=code,
                    message=_error_line(output).replace(f"{folder}/", ""),
                    lines=len(_error_lines(output)),
                    store_untouched=_listing(folder) == listing,
                    payload_ran=False,
                    seconds=time.monotonic() - started,
                )
            )
    return rows


def _listing(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _error_line(output: str) -> str:
    lines = _error_lines(output)
    return lines[-1].removeprefix("Error: ") if lines else ""


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'input':34} {'command':7} {'outcome':16} {'exit':>4} {'lines':>5} {'untouched':9} "
        f"{'ran':3}  message"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        message = (
            row.message
            if len(row.message) <= MESSAGE_WIDTH
            else row.message[: MESSAGE_WIDTH - 1] + "…"
        )
        print(
            f"{row.input:34} {row.command:7} {row.outcome:16} {row.exit_code:>4} {row.lines:>5} "
            f"{'yes' if row.store_untouched else 'NO':9} {'YES' if row.payload_ran else 'no':3}  "
            f"{message}"
        )


def summary(rows: Sequence[Row]) -> dict[str, int]:
    return {
        "inputs": len(rows),
        "recorded_failures": sum(r.outcome == "recorded failure" for r in rows),
        "fatal": sum(r.outcome == "fatal" for r in rows),
        "stored": sum(r.outcome == "stored" for r in rows),
        "not_one_line": sum(r.lines != 1 for r in rows),
        "stores_touched": sum(not r.store_untouched for r in rows),
        "payloads_run": sum(r.payload_ran for r in rows),
        "zero_exit": sum(r.exit_code == 0 for r in rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subprocess", action="store_true", help="run `python -m zooscan`")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    cli = Cli(args.subprocess)
    with tempfile.TemporaryDirectory(prefix="zooscan-hostile-") as tmp:
        root = Path(tmp)
        dataset = f"folder:{photo_folder(root)}"
        store = base_store(cli, root, dataset)
        rows = checkpoint_rows(cli, root, store, dataset) + store_rows(cli, root, store, dataset)
    totals = summary(rows)
    if args.format == "json":
        print(json.dumps({"rows": [asdict(r) for r in rows], "summary": totals}, indent=2))
    else:
        print_table(rows)
        print()
        print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in totals.items()))
    bad = totals["not_one_line"] + totals["stores_touched"] + totals["payloads_run"]
    return 1 if bad or totals["zero_exit"] else 0


if __name__ == "__main__":
    sys.exit(main())
