"""Fault injection on the loopback hub: zooscan.remote either returns exactly the
right bytes (after waiting as told and retrying) or raises one clean
CheckpointError — never wrong or partial data."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hub_server import HubServer, free_env, write_checkpoint

from zooscan import checkpoints
from zooscan.errors import CheckpointError
from zooscan.remote import HubClient, HubUnavailable, fetch_tensors
from zooscan.remote.client import CONNECT_ATTEMPTS

KEYS = ["conv1.weight", "layer1.0.bn1.running_var"]
FILES = {"model.safetensors": "safetensors", "model.pth": "torch-zip", "legacy.pth": "torch-legacy"}
CDN_GET = {"path": "/_cdn/*", "method": "GET"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    free_env(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    root = tmp_path_factory.mktemp("faults")
    return {name: write_checkpoint(root / name, state, fmt) for name, fmt in FILES.items()}


@pytest.fixture(scope="module")
def expected(files) -> dict[str, dict]:
    return {name: checkpoints.read_tensors(path, KEYS) for name, path in files.items()}


@pytest.fixture
def hub(files):
    with HubServer() as server:
        server.add_repo("org/r18", files)
        yield server


def _client(hub: HubServer, **options) -> HubClient:
    settings = {"backoff_base": 0.01, "backoff_max": 0.05, "max_retries": 4, "timeout": 5.0}
    settings.update(options)
    return HubClient(endpoint=hub.endpoint, token=False, **settings)


def _fetch_and_check(client: HubClient, expected, name: str):
    f = client.resolve("org/r18", name)
    result = fetch_tensors(client, f, KEYS)
    for key in KEYS:
        got, want = result.tensors[key], expected[name][key]
        assert got.sha256 == want.sha256 and np.array_equal(got.array, want.array)
    return result


# ----------------------------------------------------------------------- rate limits


def test_retry_after_storm_is_waited_out(hub, expected):
    hub.inject("status", status=429, retry_after=1, count=2, **CDN_GET)
    client = _client(hub)
    start = time.monotonic()

    _fetch_and_check(client, expected, "model.safetensors")

    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 4.0  # two Retry-After: 1 answers, each waited as told
    assert client.retries == 2
    assert [r.status for r in hub.requests(path="/_cdn/*")][:2] == [429, 429]


def test_a_429_pauses_every_worker_on_that_origin(hub):
    hub.inject("status", status=429, retry_after=1, count=1, path="/api/models")
    client = _client(hub)
    first = threading.Thread(target=client.json, args=("/api/models",))
    first.start()
    deadline = time.monotonic() + 5
    while client.retries == 0 and time.monotonic() < deadline:  # counted once it has paused
        time.sleep(0.005)
    told_at = time.time()

    client.json("/api/models")  # another worker, after the 429 came back
    first.join()

    later = [r.time for r in hub.requests(path="/api/models") if r.status == 200]
    assert len(later) == 2
    assert min(later) >= told_at + 0.8  # nobody asked again before Retry-After ran out


def test_ratelimit_header_without_retry_after(hub):
    hub.inject("status", status=429, ratelimit=(0, 1), count=1, path="/api/models")
    client = _client(hub)
    start = time.monotonic()
    assert [m["id"] for m in client.json("/api/models")] == ["org/r18"]
    assert time.monotonic() - start >= 0.95


def test_spent_ratelimit_window_paces_the_next_request(hub):
    spent = {"RateLimit": '"api";r=0;t=1', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
    hub.inject("headers", headers=spent, count=1, path="/api/models")
    client = _client(hub)
    client.json("/api/models")  # succeeds, but says the window is spent for 1 s
    client.json("/api/models")
    times = [r.time for r in hub.requests(path="/api/models")]
    assert times[1] - times[0] >= 0.9


def test_retry_after_beyond_the_time_budget_fails_fast(hub):
    hub.inject("status", status=429, retry_after=3600, count=None, **CDN_GET)
    client = _client(hub, max_elapsed=5)
    f = client.resolve("org/r18", "model.safetensors")
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="HTTP 429"):
        fetch_tensors(client, f, KEYS)
    assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------ transient faults


TRANSIENT = {
    "500": {"kind": "status", "status": 500},
    "502": {"kind": "status", "status": 502},
    "503-retry-after": {"kind": "status", "status": 503, "retry_after": 0},
    "reset-mid-body": {"kind": "reset", "after_bytes": 1000},
    "truncated-body": {"kind": "truncate", "after_bytes": 5000},
    "content-length-too-long": {"kind": "wrong_length", "length_delta": 700},
    "content-length-too-short": {"kind": "wrong_length", "length_delta": -700},
}


@pytest.mark.parametrize("fault", list(TRANSIENT))
@pytest.mark.parametrize("name", ["model.safetensors", "model.pth"])
def test_transient_faults_are_retried_to_the_right_bytes(hub, expected, fault, name):
    params = dict(TRANSIENT[fault])
    hub.inject(params.pop("kind"), count=2, **params, **CDN_GET)
    client = _client(hub)

    _fetch_and_check(client, expected, name)

    assert client.retries >= 2
    assert sum(r.fault is not None for r in hub.requests()) == 2


@pytest.mark.parametrize("fault", ["500", "reset-mid-body"])
def test_faults_on_the_hub_head_are_retried(hub, expected, fault):
    params = dict(TRANSIENT[fault])
    hub.inject(params.pop("kind"), path="/org/r18/resolve/*", method="HEAD", count=2, **params)
    client = _client(hub)
    _fetch_and_check(client, expected, "model.pth")
    assert client.retries >= 2


def test_persistent_5xx_gives_a_clean_error_after_max_retries(hub):
    hub.inject("status", status=503, count=None, **CDN_GET)
    client = _client(hub, max_retries=3)
    f = client.resolve("org/r18", "model.pth")
    with pytest.raises(HubUnavailable, match=r"gave up after 4 attempts \(HTTP 503"):
        fetch_tensors(client, f, KEYS)
    assert len(hub.requests(path="/_cdn/*")) == 4


def test_persistent_truncation_never_returns_partial_data(hub):
    hub.inject("truncate", after_bytes=100, count=None, **CDN_GET)
    client = _client(hub, max_retries=2)
    f = client.resolve("org/r18", "model.safetensors")
    with pytest.raises(HubUnavailable, match="truncated body: 100 of"):
        fetch_tensors(client, f, KEYS)


def test_stalled_body_times_out_and_is_retried(hub, expected):
    hub.inject("stall", after_bytes=2000, delay=3, count=1, **CDN_GET)
    client = _client(hub, timeout=0.5)
    start = time.monotonic()
    _fetch_and_check(client, expected, "model.pth")
    assert time.monotonic() - start < 2.5
    assert client.retries == 1


def test_slow_responses_are_waited_for(hub, expected):
    hub.inject("delay", delay=0.3, count=3, **CDN_GET)
    client = _client(hub, timeout=5)
    _fetch_and_check(client, expected, "model.safetensors")
    assert client.retries == 0


def test_full_download_resumes_where_it_was_cut(hub, expected, files):
    size = files["legacy.pth"].stat().st_size
    hub.inject("reset", after_bytes=size // 3, count=1, **CDN_GET)
    hub.inject("wrong_length", length_delta=-1000, count=1, **CDN_GET)
    client = _client(hub)

    result = _fetch_and_check(client, expected, "legacy.pth")

    ranges = [r.headers.get("Range") for r in hub.requests(path="/_cdn/*")]
    assert any(r and r.endswith("-") and r != "bytes=0-" for r in ranges)  # resumed, not restarted
    assert result.bytes_fetched < 2 * size


def test_corrupted_full_download_is_caught_by_the_lfs_sha256(hub, files):
    hub.inject("corrupt", after_bytes=123456, count=None, **CDN_GET)
    client = _client(hub)
    f = client.resolve("org/r18", "legacy.pth")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        fetch_tensors(client, f, KEYS)


def test_corrupted_torch_storage_is_caught_by_the_zip_crc(hub):
    client = _client(hub)
    f = client.resolve("org/r18", "model.pth")
    fetch_tensors(client, f, ["fc.bias"])  # warm: head/tail reads happen without faults
    hub.inject("corrupt", after_bytes=700, count=None, **CDN_GET)
    with pytest.raises(CheckpointError, match="CRC-32"):
        fetch_tensors(client, f, ["layer4.1.conv2.weight"])


# ----------------------------------------------------------------- the hub goes away


def test_expired_cdn_urls_are_located_again(hub, expected):
    client = _client(hub)
    f = client.resolve("org/r18", "model.pth")
    hub.expire_cdn_urls()
    result = fetch_tensors(client, f, KEYS)
    assert result.tensors[KEYS[0]].sha256 == expected["model.pth"][KEYS[0]].sha256
    statuses = [(r.method, r.status) for r in hub.requests()]
    assert ("GET", 403) in statuses and statuses.count(("HEAD", 302)) == 2


def test_a_file_replaced_between_reads_is_never_mixed(hub, files, tmp_path):
    torch.manual_seed(2)
    other = write_checkpoint(
        tmp_path / "other.safetensors", torchvision.models.resnet18().state_dict(), "safetensors"
    )
    assert other.stat().st_size == files["model.safetensors"].stat().st_size
    client = _client(hub)
    f = client.resolve("org/r18", "model.safetensors")
    fetch_tensors(client, f, ["conv1.weight"])  # first read: header and conv1
    hub.add_repo("org/r18", {"model.safetensors": other}, sha="b" * 40)  # a new commit
    with pytest.raises(CheckpointError, match="changed on the server between two reads"):
        fetch_tensors(client, f, ["fc.weight"])


def test_server_stopping_mid_transfer_gives_a_clean_error(hub):
    hub.inject("stall", after_bytes=1000, delay=5, count=None, **CDN_GET)
    client = _client(hub, max_retries=3, timeout=10)
    f = client.resolve("org/r18", "model.safetensors")
    errors = []

    def fetch():
        try:
            fetch_tensors(client, f, KEYS)
        except CheckpointError as exc:
            errors.append(exc)

    worker = threading.Thread(target=fetch)
    start = time.monotonic()
    worker.start()
    time.sleep(0.3)
    hub.stop()
    worker.join(timeout=10)

    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], HubUnavailable)
    # a broken transfer, then the stopped server refuses connections: CONNECT_ATTEMPTS tries
    assert f"gave up after {CONNECT_ATTEMPTS} attempts" in str(errors[0])
    assert time.monotonic() - start < 5


def test_a_hub_that_went_away_fails_fast_after_the_first_model(hub):
    client = _client(hub, max_retries=4, backoff_base=0.15, backoff_max=5)
    f = client.resolve("org/r18", "model.safetensors")
    hub.stop()
    start = time.monotonic()
    # refused connections get CONNECT_ATTEMPTS quick tries, not all of max_retries
    with pytest.raises(
        HubUnavailable, match=f"gave up after {CONNECT_ATTEMPTS} attempts.*seems down"
    ):
        fetch_tensors(client, f, KEYS)
    first = time.monotonic() - start
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="gave up after 1 attempts"):
        fetch_tensors(client, f, KEYS)  # the next model on that server: one try
    assert time.monotonic() - start < 0.2 < first


def test_random_faults_under_concurrency_never_give_wrong_data(hub, expected):
    for kind, params in (
        ("status", {"status": 503}),
        ("reset", {"after_bytes": 3000}),
        ("truncate", {"after_bytes": 10000}),
        ("wrong_length", {"length_delta": 500}),
        ("status", {"status": 429, "retry_after": 0}),
    ):
        hub.inject(kind, count=None, probability=0.08, path="*", **params)
    client = _client(hub, max_retries=12)
    names = ["model.safetensors", "model.pth"] * 6
    failures = []

    def work(name):
        try:
            _fetch_and_check(client, expected, name)
        except Exception as exc:  # collected and reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures
    assert client.retries > 0
