"""Shared fixtures: one local Ray for the integration tests, started once per session."""

from __future__ import annotations

import os

import pytest

# Tests never reach the network: keep libraries from phoning home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
