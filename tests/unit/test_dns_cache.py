"""The per-process DNS cache of pipeline.data.fetch: one lookup per host, the policy checked on
every use of a cached answer (issue 14, item 5)."""

from __future__ import annotations

import socket

import pytest

from pipeline.data import fetch


@pytest.fixture
def lookups(monkeypatch):
    """getaddrinfo answering every name with 127.0.0.1, counting its calls."""
    calls = []

    def fake(host, port, *args, **kwargs):
        calls.append(host)
        if host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    fetch.DNS_CACHE.clear()
    yield calls
    fetch.DNS_CACHE.clear()


def test_a_host_is_looked_up_once(lookups):
    for _ in range(5):
        addresses = fetch._resolve("images.example", 80, ("127.0.0.1/32",))
        assert addresses == [(socket.AF_INET, ("127.0.0.1", 80))]
    assert lookups == ["images.example"]
    fetch._resolve("images.example", 443, ("127.0.0.1/32",))  # another port: its own entry
    assert lookups == ["images.example", "images.example"]


def test_a_cached_answer_is_still_checked_against_the_policy(lookups):
    fetch._resolve("images.example", 80, ("127.0.0.1/32",))
    # The same cached answer, under a policy that does not allow loopback: refused.
    with pytest.raises(fetch._Failure) as err:
        fetch._resolve("images.example", 80, ())
    assert err.value.reason == "refused_address"
    assert lookups == ["images.example"]


def test_a_missing_name_is_cached_as_missing(lookups):
    for _ in range(3):
        with pytest.raises(fetch._Failure) as err:
            fetch._resolve("gone.invalid", 80, ())
        assert err.value.reason == "dns_error"
    assert lookups == ["gone.invalid"]


def test_entries_expire_and_the_cache_is_bounded():
    cache = fetch.DnsCache(ttl=-1.0, size=2)
    cache.put(("a", 1), "x")
    assert cache.get(("a", 1)) is None  # expired at once
    cache = fetch.DnsCache(ttl=60.0, size=2)
    for name in "abc":
        cache.put((name, 1), name)
    assert [cache.get((n, 1)) for n in "abc"] == [None, "b", "c"]
