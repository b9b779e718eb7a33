"""Bytes and time to fetch one first-layer tensor from a hub, vs downloading the file.

ResNet-50 (torchvision, ``conv1.weight``) and ViT-B/16 (timm
``vit_base_patch16_224``, ``patch_embed.proj.weight``) checkpoints — the real keys and
shapes, random values — are written as safetensors (``safetensors.torch.save_file``)
and torch zip (``torch.save``) and served by the loopback hub of the test suite
(``tests/hub_server.py``: hub + CDN redirect, Range support). For each file a fresh
:class:`zooscan.remote.HubClient` resolves it (one ``HEAD``) and
:func:`zooscan.remote.fetch_tensors` reads the first-layer tensor; the server's own
counter gives the bytes it wrote (status lines, headers and bodies). Then the whole
file is downloaded with :meth:`HubClient.read_all` for comparison.

The loopback network has no latency and no bandwidth limit, so its times measure
CPU work; ``--mbps`` and ``--rtt-ms`` make the server pace bodies and delay every
request to emulate a real connection.

Run: ``.venv/bin/python benchmarks/bench_fetch_bytes.py [--mbps 100 --rtt-ms 30] [--no-full]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BUDGET = 150 * 1024
MODELS = {
    "ResNet-50": ("resnet50", "conv1.weight"),
    "ViT-B/16": ("vit_base_patch16_224", "patch_embed.proj.weight"),
}
FILES = {"safetensors": "model.safetensors", "torch-zip": "pytorch_model.bin"}


def _write_models(root: Path) -> dict[str, tuple[str, dict[str, Path]]]:
    import timm
    import torch
    import torchvision
    from hub_server import random_state_dict, write_checkpoint

    out = {}
    for label, (arch, key) in MODELS.items():
        with torch.device("meta"):
            model = torchvision.models.resnet50() if arch == "resnet50" else timm.create_model(arch)
        state = random_state_dict(model)
        files = {
            fmt: write_checkpoint(root / arch / name, state, fmt) for fmt, name in FILES.items()
        }
        out[label] = (key, files)
    return out


def _measure(server, label: str, key: str, fmt: str, path: Path, full: bool) -> dict:
    from zooscan.remote import HubClient, fetch_tensors

    repo = f"bench/{MODELS[label][0]}"
    client = HubClient(endpoint=server.endpoint, token=False)
    server.reset_log()
    start = time.perf_counter()
    f = client.resolve(repo, FILES[fmt])
    result = fetch_tensors(client, f, [key])
    ranged_s = time.perf_counter() - start
    sent = server.bytes_sent()
    tensor = result.tensors[key]
    row = {
        "model": label,
        "format": fmt,
        "file_bytes": path.stat().st_size,
        "sent_bytes": sent,
        "tensor_bytes": tensor.byte_range[1] - tensor.byte_range[0],
        "requests": len(server.requests()),
        "ranged_s": ranged_s,
        "full_s": None,
    }
    if full:
        start = time.perf_counter()
        data = client.read_all(client.resolve(repo, FILES[fmt]))
        row["full_s"] = time.perf_counter() - start
        assert len(data) == row["file_bytes"]
    client.close()
    return row


def _print(rows: list[dict]) -> None:
    header = (
        f"{'model':<10} {'format':<12} {'file':>10} {'sent':>10} {'tensor':>10} "
        f"{'overhead':>10} {'budget':>6} {'sent/file':>10} {'reqs':>5} {'ranged':>9} {'full':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        overhead = r["sent_bytes"] - r["tensor_bytes"]
        full = f"{r['full_s'] * 1000:8.0f}ms" if r["full_s"] is not None else f"{'-':>9}"
        print(
            f"{r['model']:<10} {r['format']:<12} {_mb(r['file_bytes']):>10} "
            f"{_kb(r['sent_bytes']):>10} {_kb(r['tensor_bytes']):>10} {_kb(overhead):>10} "
            f"{'ok' if overhead <= BUDGET else 'OVER':>6} "
            f"{r['sent_bytes'] / r['file_bytes']:>10.2%} {r['requests']:>5} "
            f"{r['ranged_s'] * 1000:7.0f}ms {full}"
        )
    print(
        "\nsent: every byte the hub and CDN wrote (status lines, headers, bodies) for the "
        "resolve HEAD and the ranged reads;\noverhead = sent - tensor bytes (budget "
        f"{BUDGET // 1024} KB); ranged: resolve + fetch; full: HubClient.read_all of the file."
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mbps", type=float, default=None, help="pace bodies to this Mbit/s")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="delay every request (ms)")
    parser.add_argument("--no-full", action="store_true", help="skip the full downloads")
    args = parser.parse_args()

    from hub_server import HubServer

    with tempfile.TemporaryDirectory(prefix="zooscan-bench-") as tmp:
        models = _write_models(Path(tmp))
        bandwidth = args.mbps * 1e6 / 8 if args.mbps else None
        with HubServer(bandwidth=bandwidth, latency=args.rtt_ms / 1000) as server:
            for label, (_, files) in models.items():
                repo = server.add_repo(
                    f"bench/{MODELS[label][0]}", {FILES[f]: p for f, p in files.items()}
                )
                for hosted in repo.files.values():
                    assert hosted.sha256  # the server hashes now, not inside a timed request
            rows = [
                _measure(server, label, key, fmt, path, not args.no_full)
                for label, (key, files) in models.items()
                for fmt, path in files.items()
            ]
    network = "loopback, unthrottled"
    if args.mbps or args.rtt_ms:
        network = f"emulated {args.mbps or 'unlimited'} Mbit/s, {args.rtt_ms:.0f} ms per request"
    print(f"zooscan.remote fetch of the first-layer tensor ({network})\n")
    _print(rows)


if __name__ == "__main__":
    main()
