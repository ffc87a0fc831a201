"""The fetch policy on hostile URLs and host names (issue 15, items 8 and fuzzing): every URL
ends with a reason of the policy's own vocabulary, never an exception; DNS lookups are bounded
by the request's deadline."""

from __future__ import annotations

import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import DownloadConfig
from pipeline.data import fetch as fetch_module
from pipeline.data.download import DownloadStage
from pipeline.data.fetch import fetch

# Fetching must never reach the network here: every host resolves to a refused address.
CFG = DownloadConfig(timeout=0.5, retries=0)
REASONS = {"bad_scheme", "bad_url", "dns_error", "refused_address", "timeout"}
HOSTY = st.lists(
    st.sampled_from([*"ab.-[]:@%/?#\\ \x00\t\n", "\u0430", "\uff0e", "xn--", "999999"]),
    max_size=12,
).map("".join)


def _no_dns(monkeypatch):
    def resolve(host, port, *args, **kwargs):  # a resolver that names a private address
        if not host or "\x00" in host:
            raise UnicodeError("bad name")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_an_unbalanced_bracket_is_a_bad_url_not_an_internal_error(monkeypatch):
    _no_dns(monkeypatch)
    assert fetch("http://a]b/", CFG).reason == "bad_url"
    assert fetch("http://[::1/", CFG).reason == "bad_url"
    stage = DownloadStage({"timeout": 0.5, "retries": 0})
    assert stage.download("http://a]b/").reason == "bad_url"


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scheme=st.sampled_from(["http", "https", "HTTP", "ftp", "", "javascript"]), host=HOSTY,
       rest=st.text(max_size=12))  # fmt: skip
def test_any_url_ends_with_a_policy_reason(monkeypatch, scheme, host, rest):
    _no_dns(monkeypatch)
    result = fetch(f"{scheme}://{host}/{rest}", CFG)
    assert result.body is None and result.reason in REASONS, (result.reason, result.error)


def test_a_hanging_dns_lookup_is_bounded_by_the_deadline(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(5)
        raise socket.gaierror(socket.EAI_AGAIN, "still trying")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(fetch_module, "DEADLINE_FACTOR", 1)
    start = time.monotonic()
    result = fetch("http://slow-dns.example/a.jpg", DownloadConfig(timeout=0.3, retries=0))
    assert result.reason == "timeout"
    assert time.monotonic() - start < 2  # the old code waited the lookup's 5 s
