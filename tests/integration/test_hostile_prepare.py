"""A hostile URL list through the whole prepare stage, against real servers on loopback.

Every row must end in shards or rejects with the right reason, no request may reach a refused
address (a tripwire server on 127.0.0.2 counts connections; only 127.0.0.1/32 is allowed),
and memory stays bounded while huge bodies are refused.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.config import DownloadConfig, FilterConfig, PrepareConfig
from pipeline.data.download import DownloadStage
from pipeline.data.prepare import read_url_list, run_prepare
from pipeline.rundir import RunDir

pytestmark = pytest.mark.integration

MAX_BYTES = 300_000


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((w, h)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _claiming(w: int, h: int) -> bytes:
    """A tiny JPEG whose header claims w x h pixels: a decompression bomb's header."""
    data = bytearray(_jpeg(16, 16, 0))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


GOOD = [_jpeg(400, 300, seed) for seed in range(4)]
_SOS = GOOD[0].index(b"\xff\xda")
CORRUPT = GOOD[0][:_SOS] + b"\xff\xd9"  # a valid header, then no scan data at all
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="900"><rect/></svg>'
HTML = b"<!doctype html><html><body><img src=x.jpg></body></html>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, status: int = 200, length: int | None = None, **headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_forever(self):
        """A body with no Content-Length that never ends: only the client's cap stops it."""
        self.send_response(200)
        self.end_headers()
        chunk = b"\xff" * 65536
        while True:
            self.wfile.write(chunk)

    def do_GET(self):
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.hits[path] += 1
        try:
            self._route(path)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, path: str):  # noqa: C901 - one branch per hostile case reads best
        tport = self.server.tripwire_port
        if path.startswith("/good/"):
            self._send(GOOD[int(path.rsplit("/", 1)[1])], Content_Type="image/jpeg")
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            self._redirect(f"/chain/{n - 1}" if n > 1 else "/good/3")
        elif path == "/loop":
            self._redirect("/loop")
        elif path.startswith("/to/"):  # a redirect to a refused address
            self._redirect(f"http://{REFUSED_HOSTS[path[4:]]}:{tport}/secret")
        elif path == "/status/500":
            self._send(b"down", 500)
        elif path == "/status/404":
            self._send(b"gone", 404)
        elif path == "/empty":
            self._send(b"", Content_Type="image/jpeg")
        elif path == "/claims-huge-length":
            self._send(b"", length=10 * MAX_BYTES, Content_Type="image/jpeg")
        elif path == "/endless":
            self._stream_forever()
        elif path == "/truncated.jpg":
            self._send(GOOD[1][: len(GOOD[1]) // 2], Content_Type="image/jpeg")
        elif path == "/corrupt.jpg":
            self._send(CORRUPT, Content_Type="image/jpeg")
        elif path == "/image.svg":
            self._send(SVG, Content_Type="image/svg+xml")
        elif path == "/page.html":
            self._send(HTML, Content_Type="text/html")
        elif path == "/bomb.jpg":
            self._send(_claiming(40_000, 40_000), Content_Type="image/jpeg")
        elif path == "/noai.jpg":
            self._send(GOOD[2], X_Robots_Tag="noai")
        elif path == "/drip":  # headers at once, then a byte every 100 ms
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            for _ in range(1000):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._send(b"", 404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class _Tripwire(_Server):
    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return False


@pytest.fixture(scope="module")
def servers():
    tripwire = _Tripwire(("127.0.0.2", 0), _Handler)
    tripwire.connections = 0
    main = _Server(("127.0.0.1", 0), _Handler)
    main.lock, main.hits = threading.Lock(), Counter()
    main.tripwire_port = tripwire.server_address[1]
    for server in (main, tripwire):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield main, tripwire
    for server in (main, tripwire):
        server.shutdown()
        server.server_close()


REFUSED_HOSTS = {
    "loopback": "127.0.0.2",
    "metadata": "169.254.169.254",  # link-local: the cloud metadata endpoint
    "private": "10.1.2.3",
    "multicast": "224.0.0.1",
    "reserved": "240.0.0.1",
    "unspecified": "0.0.0.0",
    "ipv6-loopback": "[::1]",
}
CAPTION = b"a photo of something on a table"


def _cases(base: str, tport: int) -> list[tuple[str, bytes, tuple[str, str] | None]]:
    """(url, caption bytes, expected (stage, reason) or None for a sample)."""
    dl = "download"
    refused = (dl, "refused_address")
    return [
        (f"{base}/good/0", CAPTION, None),
        (f"{base}/good/1?x=1", "a caf\u00e9 in Z\u00fcrich at night".encode(), None),
        (f"{base}/chain/5", CAPTION, None),  # five redirects are allowed
        (f"{base}/good/0", CAPTION, ("input", "duplicate_url")),
        (f"{base}/good/0?copy", CAPTION, ("filter", "duplicate_image")),
        (f"{base}/good/2", b"caption \xff\xfe not utf-8", ("input", "caption_not_utf8")),
        (f"{base}/good/2?empty", b"", ("filter", "caption_too_short")),
        ("", CAPTION, ("input", "missing_url")),
        ("file:///etc/passwd", CAPTION, (dl, "bad_scheme")),
        ("ftp://127.0.0.1/x.jpg", CAPTION, (dl, "bad_scheme")),
        ("gopher://127.0.0.1:70/", CAPTION, (dl, "bad_scheme")),
        (f"{base}/chain/6", CAPTION, (dl, "too_many_redirects")),
        (f"{base}/loop", CAPTION, (dl, "too_many_redirects")),
        (f"http://127.0.0.2:{tport}/direct", CAPTION, refused),
        (f"http://2130706434:{tport}/decimal", CAPTION, refused),  # a name for 127.0.0.2
        (f"http://127.2:{tport}/short", CAPTION, refused),
        (f"http://[::ffff:127.0.0.2]:{tport}/mapped", CAPTION, refused),
        ("http://169.254.169.254/latest/meta-data/", CAPTION, refused),
        *((f"{base}/to/{name}", CAPTION, refused) for name in REFUSED_HOSTS),
        (f"{base}/drip", CAPTION, (dl, "timeout")),
        (f"{base}/drip-headers", CAPTION, (dl, "timeout")),
        (f"{base}/empty", CAPTION, (dl, "empty_body")),
        (f"{base}/claims-huge-length", CAPTION, (dl, "too_large")),
        (f"{base}/endless", CAPTION, (dl, "too_large")),
        (f"{base}/truncated.jpg", CAPTION, (dl, "truncated_image")),
        (f"{base}/corrupt.jpg", CAPTION, (dl, "decode_error")),
        (f"{base}/image.svg", CAPTION, (dl, "not_an_image")),
        (f"{base}/page.html", CAPTION, (dl, "not_an_image")),
        (f"{base}/bomb.jpg", CAPTION, (dl, "too_many_pixels")),
        (f"{base}/noai.jpg", CAPTION, (dl, "opted_out")),
        (f"{base}/status/500", CAPTION, (dl, "http_500")),
        (f"{base}/status/404", CAPTION, (dl, "http_404")),
    ]


def _write_csv(path: Path, cases) -> None:
    """Raw bytes: one caption is not UTF-8, which a text writer could not even produce."""
    lines = [b"url,caption"]
    for url, caption, _ in cases:
        lines.append(url.encode() + b',"' + caption + b'"')
    path.write_bytes(b"\n".join(lines) + b"\n")


CFG = PrepareConfig(
    rows_per_shard=16,
    download=DownloadConfig(
        allowed_networks=("127.0.0.1/32",),
        timeout=0.5,
        retries=1,
        batch_size=8,
        thread_count=8,
        max_bytes=MAX_BYTES,
        max_pixels=20_000_000,
    ),
    filters=FilterConfig(min_image_side=32),
)


@pytest.fixture(scope="module")
def hostile(ray_local, servers, tmp_path_factory):
    main, tripwire = servers
    base = f"http://127.0.0.1:{main.server_address[1]}"
    cases = _cases(base, tripwire.server_address[1])
    folder = tmp_path_factory.mktemp("hostile")
    _write_csv(folder / "urls.csv", cases)
    urls = read_url_list(str(folder / "urls.csv"))
    run = RunDir.at(folder / "run")
    start = time.monotonic()
    stats = run_prepare(urls, run, CFG)
    elapsed = time.monotonic() - start

    def read(folder: str) -> list[dict]:
        files = sorted(Path(folder).glob("*.parquet"))
        return [r for f in files for r in pq.read_table(f).to_pylist()]

    return cases, stats, read(run.shards), read(run.rejects), elapsed


def test_each_hostile_row_is_rejected_for_its_reason(servers, hostile):
    cases, stats, samples, rejects, _ = hostile
    assert len(samples) + len(rejects) == len(cases)
    expected_samples = [url for url, _, want in cases if want is None]
    assert [s["url"] for s in samples] == expected_samples
    got = Counter((r["url"], r["stage"], r["reason"]) for r in rejects)
    want = Counter((url or None, *w) for url, _, w in cases if w is not None)
    assert got == want
    assert all(r["error"] for r in rejects)
    # Keys are the URL's, unique among samples; duplicates of a URL share its key.
    assert len({s["key"] for s in samples}) == len(samples)
    for r in samples + rejects:
        assert r["key"] == (schema.url_key(r["url"]) if r["url"] else "")
    assert stats["rows_in"] == len(cases) and stats["samples"] == len(samples)


def test_no_request_reaches_a_refused_address(servers, hostile):
    main, tripwire = servers
    assert tripwire.connections == 0
    # Redirect hops to refused addresses were answered by the main server only.
    assert main.hits["/secret"] == 0


def test_captions_survive_as_text(hostile):
    _, _, samples, rejects, _ = hostile
    assert samples[1]["caption"] == "a caf\u00e9 in Z\u00fcrich at night"
    bad = next(r for r in rejects if r["reason"] == "caption_not_utf8")
    assert bad["caption"].startswith("caption ") and "\ufffd" in bad["caption"]


def test_stalling_servers_do_not_hold_the_run(hostile):
    # Two drips at 1 byte / 100 ms would take 100 s each; the request deadline is
    # 3 x 0.5 s, retried once: the whole list ends long before.
    assert hostile[4] < 60


def test_funnel_counts_failing_domains(hostile):
    stats = hostile[1]
    domains = {d["domain"]: d for d in stats["failing_domains"]}
    # By host name, whatever the scheme: ftp:// and gopher:// to 127.0.0.1 count there too.
    assert domains["127.0.0.1"]["failures"] == sum(
        1
        for r in hostile[3]
        if r["stage"] == "download" and urlsplit(r["url"]).hostname == "127.0.0.1"
    )
    assert domains["169.254.169.254"]["reasons"] == {"refused_address": 1}


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_memory_stays_bounded_while_endless_bodies_are_refused(servers):
    # Eight endless bodies at once, with the default 16 MiB cap: the process must not hold
    # more than a few caps' worth, however much the servers would send.
    main = servers[0]
    base = f"http://127.0.0.1:{main.server_address[1]}"
    cfg = DownloadConfig(allowed_networks=("127.0.0.1/32",), thread_count=8, retries=0)
    stage = DownloadStage(dataclasses.asdict(cfg))
    import pandas as pd

    batch = pd.DataFrame(
        {
            "key": [str(i) for i in range(8)],
            "url": [f"{base}/endless?{i}" for i in range(8)],
            "caption": ["c"] * 8,
            "stage": None,
            "reason": None,
            "error": None,
        }
    )
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = stage(batch)
    finally:
        done.set()
        sampler.join()
    assert out["reason"].tolist() == ["too_large"] * 8
    served = main.hits["/endless"]
    assert served >= 8
    # 8 x 16 MiB in flight at most, plus the joined copy of one; far below what was offered.
    assert peak[0] - baseline < 8 * cfg.max_bytes + 64 * 2**20
