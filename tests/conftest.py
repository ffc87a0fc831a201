"""Shared fixtures: one local Ray for the integration tests, started once per session."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Tests never reach the network: keep libraries from phoning home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 tests talk to a moto server on 127.0.0.1 (the `s3_server` fixture starts it). Its
# address and fake credentials are set here, before any test starts Ray, because Ray's workers
# take their environment from the driver when Ray starts.
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
for _key, _value in S3_ENV.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (never an already running cluster), shared by integration tests."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def no_injected_crash(monkeypatch):
    """A crash test arms pipeline.faults; none stays armed for the next test."""
    from pipeline import faults

    faults.reset()
    yield
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A new, empty bucket on the test server, as an `s3://NAME` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
