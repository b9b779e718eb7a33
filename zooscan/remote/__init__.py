"""Fetch only the first-layer tensor of remote checkpoints (DESIGN §3).

:class:`HubClient` is the HTTP layer (one per scan, shared by the workers): hub
file resolution, ranged reads, JSON API calls, retries with back-off, rate-limit
pacing, offline mode and the local Hugging Face cache. :func:`fetch_tensors` reads
named tensors from a safetensors, torch zip, legacy torch or npz file with as few
bytes as the format allows.

Typical use by a source::

    client = HubClient()                      # $HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE
    f = client.resolve("timm/resnet18.a1_in1k", "model.safetensors")
    result = fetch_tensors(client, f, ["conv1.weight"])
    weight = result.tensors["conv1.weight"].array       # float32, (64, 3, 7, 7)
    provenance = Provenance(repo=f.repo, revision=f.revision, file=f.filename,
                            tensor_key=result.tensors["conv1.weight"].key,
                            byte_range=result.tensors["conv1.weight"].byte_range,
                            sha256=result.tensors["conv1.weight"].sha256,
                            bytes_fetched=result.bytes_fetched)

Every failure is a :class:`zooscan.errors.CheckpointError` (the subclasses
:class:`HubNotFound`, :class:`HubAccessDenied`, :class:`HubUnavailable` and
:class:`HubOffline` say which kind), so a scan records the reason and goes on.
"""

from zooscan.remote.cache import cached_file, hub_cache_dir
from zooscan.remote.client import (
    DEFAULT_ENDPOINT,
    HubAccessDenied,
    HubClient,
    HubNotFound,
    HubOffline,
    HubUnavailable,
    RemoteFile,
)
from zooscan.remote.ranged import (
    FetchResult,
    fetch_tensors,
    list_remote_keys,
    remote_index,
    sharded_safetensors,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "FetchResult",
    "HubAccessDenied",
    "HubClient",
    "HubNotFound",
    "HubOffline",
    "HubUnavailable",
    "RemoteFile",
    "cached_file",
    "fetch_tensors",
    "hub_cache_dir",
    "list_remote_keys",
    "remote_index",
    "sharded_safetensors",
]
