"""The download stage against real loopback servers: what the web throws at a crawler."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import io
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.config import DownloadConfig
from pipeline.data import download
from pipeline.data import fetch as fetching
from pipeline.data.download import (
    DEADLINE_FACTOR,
    DownloadStage,
    address_allowed,
    fetch,
    make_resizer,
)

MAX_BYTES = 100_000


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    img = Image.linear_gradient("L").resize((w, h))
    return Image.merge(
        mode,
        [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img]
        + ([img.rotate(90)] if mode == "RGBA" else []),
    )


def _claiming(w: int, h: int) -> bytes:
    """A tiny JPEG whose header claims w x h pixels."""
    data = bytearray(_encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


GOOD_JPG = _encode(_gradient(200, 150), "JPEG")
ALPHA_PNG = _encode(_gradient(120, 90, "RGBA"), "PNG")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
HTML = b"<!doctype html><html><body>not an image</body></html>"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, body: bytes, status: int = 200, length: bool = True, **headers) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, data: bytes) -> None:
        for i in range(len(data)):  # one byte every 50 ms, each well inside the socket timeout
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(0.05)

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            server.user_agents.append(self.headers.get("User-Agent"))
        path = urlsplit(self.path).path
        try:
            self._route(path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on us, as it should

    def _route(self, path: str) -> None:
        if path == "/good.jpg":
            self._send(GOOD_JPG, Content_Type="image/jpeg")
        elif path == "/alpha.png":
            self._send(ALPHA_PNG, Content_Type="image/png")
        elif path in ("/404", "/500", "/429"):
            self._send(b"nope", int(path[1:]))
        elif path == "/page.html":
            self._send(HTML, Content_Type="text/html")
        elif path == "/image.svg":
            self._send(SVG, Content_Type="image/svg+xml")
        elif path == "/truncated.jpg":
            self._send(GOOD_JPG[: len(GOOD_JPG) // 2], Content_Type="image/jpeg")
        elif path == "/padded.jpg":  # trailing zero bytes after FFD9 are common and harmless
            self._send(GOOD_JPG + b"\x00\x00\r\n", Content_Type="image/jpeg")
        elif path == "/bomb.jpg":
            self._send(_claiming(30_000, 30_000), Content_Type="image/jpeg")
        elif path == "/big-claim.jpg":  # over the config's max_pixels, under PIL's own limit
            self._send(_claiming(5_000, 5_000), Content_Type="image/jpeg")
        elif path == "/huge":
            self._send(b"\xff" * (MAX_BYTES + 1))
        elif path == "/huge-no-length":  # HTTP/1.0: the body ends when the connection closes
            self._send(b"\xff" * (4 * MAX_BYTES), length=False)
        elif path == "/empty":
            self._send(b"")
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            self._redirect(f"/chain/{n - 1}" if n > 1 else "/good.jpg")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/to-tripwire":
            self._redirect(f"http://127.0.0.2:{self.server.tripwire_port}/secret")
        elif path == "/noai.jpg":
            self._send(GOOD_JPG, X_Robots_Tag="noai")
        elif path == "/other-bot-noai.jpg":  # addressed to another crawler: not to us
            self._send(GOOD_JPG, X_Robots_Tag="otherbot: noai")
        elif path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            self._trickle(b"x" * 1000)
        elif path == "/stall-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._trickle(b"X-Slow: " + b"a" * 1000)
        else:
            self._send(b"", 404)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops SYNs from a 16-thread batch


class _Tripwire(_Server):
    """Counts every connection it accepts: nothing may ever reach it."""

    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return False


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def servers():
    tripwire = _serve(_Tripwire(("127.0.0.2", 0), _Handler))
    tripwire.connections = 0
    main = _Server(("127.0.0.1", 0), _Handler)
    main.lock, main.hits, main.user_agents = threading.Lock(), Counter(), []
    main.tripwire_port = tripwire.server_address[1]
    _serve(main)
    yield main, tripwire
    for server in (main, tripwire):
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def base(servers) -> str:
    return f"http://127.0.0.1:{servers[0].server_address[1]}"


CFG = DownloadConfig(
    image_size=64,
    timeout=0.5,
    retries=0,
    allowed_networks=("127.0.0.1/32",),
    max_bytes=MAX_BYTES,
    max_pixels=10_000_000,
)


def _batch(urls: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "key": [f"k{i}" for i in range(len(urls))],
            "url": urls,
            "caption": [f"caption {i}" for i in range(len(urls))],
            "stage": None,
            "reason": None,
            "error": None,
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_reasons(servers, base):
    main, tripwire = servers
    tport = tripwire.server_address[1]
    png = base64.b64encode(ALPHA_PNG).decode()
    expected = {
        f"{base}/good.jpg": None,
        f"{base}/alpha.png": None,
        f"{base}/padded.jpg": None,
        f"{base}/chain/3": None,
        f"{base}/other-bot-noai.jpg": None,
        f"{base}/404": "http_404",
        f"{base}/500": "http_500",
        f"{base}/page.html": "not_an_image",
        f"{base}/image.svg": "not_an_image",
        f"{base}/truncated.jpg": "truncated_image",
        f"{base}/bomb.jpg": "too_many_pixels",
        f"{base}/big-claim.jpg": "too_many_pixels",
        f"{base}/huge": "too_large",
        f"{base}/huge-no-length": "too_large",
        f"{base}/empty": "empty_body",
        f"{base}/loop": "too_many_redirects",
        f"{base}/to-tripwire": "refused_address",
        f"http://127.0.0.2:{tport}/direct": "refused_address",
        f"http://[::1]:{tport}/": "refused_address",
        "http://169.254.169.254/latest/meta-data/": "refused_address",
        f"{base}/stall": "timeout",
        f"{base}/stall-headers": "timeout",
        f"{base}/noai.jpg": "opted_out",
        "file:///etc/passwd": "bad_scheme",
        "ftp://127.0.0.1/image.jpg": "bad_scheme",
        f"data:image/png;base64,{png}": "bad_scheme",
        "http://a..b/x.jpg": "dns_error",
        "http://127.0.0.1:99999/x.jpg": "bad_url",
        "http:///x.jpg": "bad_url",
        f"http://127.0.0.1:{_free_port()}/x.jpg": "connection_error",
        f"https://127.0.0.1:{main.server_address[1]}/good.jpg": "tls_error",
    }
    batch = _batch(list(expected))
    stage = DownloadStage(dataclasses.asdict(CFG))
    start = time.monotonic()
    out = stage(batch)
    elapsed = time.monotonic() - start

    assert list(out["key"]) == list(batch["key"]), "row order is preserved"
    got = dict(zip(out["url"], out["reason"], strict=True))
    assert got == expected
    # The stallers end at the request deadline, not when the server would have finished.
    assert elapsed < DEADLINE_FACTOR * CFG.timeout + 2.0
    assert tripwire.connections == 0

    failed = out[out["reason"].notna()]
    assert (failed["stage"] == "download").all()
    assert failed["jpg"].isna().all() and failed["width"].isna().all()
    assert failed["error"].map(lambda e: isinstance(e, str) and e != "").all()
    ok = out[out["reason"].isna()]
    assert ok["stage"].isna().all()
    assert (ok["width"] == 64).all() and (ok["height"] == 64).all()
    assert str(out["width"].dtype) == "Int64"
    assert out["download_seconds"].sum() == pytest.approx(elapsed, rel=0.2)
    assert all("clip-pipeline" in ua for ua in main.user_agents)


def test_output_matches_img2dataset_resizer(base):
    # Without the fast path, the bytes are exactly the Resizer's.
    cfg = dataclasses.replace(CFG, fast_resize=False)
    stage = DownloadStage(dataclasses.asdict(cfg))
    out = stage(_batch([f"{base}/good.jpg", f"{base}/alpha.png"]))
    resizer = make_resizer(cfg)
    for row, body, size in zip(
        out.itertuples(), (GOOD_JPG, ALPHA_PNG), ((200, 150), (120, 90)), strict=True
    ):
        jpg, w, h, ow, oh, err = resizer(io.BytesIO(body))
        assert err is None
        assert row.jpg == jpg
        assert (row.width, row.height, row.original_width, row.original_height) == (w, h, ow, oh)
        assert (row.original_width, row.original_height) == size
        assert row.sha256 == hashlib.sha256(body).hexdigest()  # of the downloaded bytes
        assert Image.open(io.BytesIO(row.jpg)).size == (64, 64)


def _photo(w: int, h: int, seed: int) -> bytes:
    """Photo-like: gradients, noise and blurred shapes, so JPEG detail is realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    pixels += rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, w // 3)
        draw.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return _encode(img.filter(ImageFilter.GaussianBlur(1)), "JPEG")


@pytest.mark.parametrize(
    "mode,size", [("center_crop", 64), ("keep_ratio", 64), ("border", 224), ("keep_ratio", 224)]
)
def test_fast_resize_looks_like_img2dataset_resizer(mode, size):
    # Reduced-scale JPEG decoding: the same sizes as the Resizer's full decode, and pixels a
    # couple of levels (of 255) apart on average: visually the same.
    cfg = dataclasses.replace(CFG, image_size=size, resize_mode=mode)
    resizer = make_resizer(cfg)
    used_fast = 0
    for i, (w, h) in enumerate([(1999, 1500), (1024, 683), (600, 900), (457, 301), (1500, 451)]):
        body = _photo(w, h, seed=i)
        fast = download.process_image(body, cfg, resizer)
        jpg, rw, rh, ow, oh, err = resizer(io.BytesIO(body))
        assert err is None and fast.reason is None
        assert (fast.width, fast.height, fast.original_width, fast.original_height) == (
            rw,
            rh,
            ow,
            oh,
        )
        with Image.open(io.BytesIO(body)) as im:
            used_fast += download._fast_resize(im, resizer) is not None
        a = np.asarray(Image.open(io.BytesIO(fast.jpg)), dtype=float)
        b = np.asarray(Image.open(io.BytesIO(jpg)), dtype=float)
        assert a.shape == b.shape
        assert np.abs(a - b).mean() < 4.0, (w, h)
    assert used_fast >= 3  # the big ones really took the reduced-scale path


def test_rows_with_a_reason_pass_through_unfetched(servers, base):
    main = servers[0]
    batch = _batch([f"{base}/good.jpg?passthrough", f"{base}/good.jpg?live"])
    batch.loc[0, ["stage", "reason", "error"]] = ["filter", "caption_too_short", "2 chars"]
    out = DownloadStage(dataclasses.asdict(CFG))(batch)
    assert out.loc[0, ["stage", "reason", "error"]].tolist() == [
        "filter",
        "caption_too_short",
        "2 chars",
    ]
    assert out.loc[0, "jpg"] is None and pd.isna(out.loc[0, "width"])
    assert main.hits["/good.jpg?passthrough"] == 0
    assert out.loc[1, "reason"] is None and out.loc[1, "jpg"] is not None


def test_missing_url_is_a_bad_url():
    out = DownloadStage(dataclasses.asdict(CFG))(_batch([None, ""]))
    assert out["reason"].tolist() == ["bad_url", "bad_url"]


def test_retries_only_transient_failures(servers, base):
    main = servers[0]
    # A generous timeout where none is expected: a busy machine must not turn a slow answer
    # into a (retried) timeout. The stall below uses a short one.
    cfg = dataclasses.replace(CFG, retries=2, timeout=5.0)
    for path, reason, requests in [
        ("/500?retry", "http_500", 3),
        ("/429?retry", "http_429", 3),
        ("/404?retry", "http_404", 1),
        ("/page.html?retry", None, 1),  # fetched fine; not being an image is no fetch error
        ("/noai.jpg?retry", "opted_out", 1),
        ("/loop?retry", "too_many_redirects", 1),
    ]:
        assert fetch(base + path, cfg).reason == reason, path
        assert main.hits[path] == requests, path

    cfg = dataclasses.replace(cfg, timeout=0.2)
    start = time.monotonic()
    result = fetch(f"{base}/stall?retry", dataclasses.replace(cfg, retries=1))
    assert (result.reason, result.transient) == ("timeout", True)
    assert main.hits["/stall?retry"] == 2
    # Ended by the deadline of each attempt (~1.2 s), not by the server's 50 s trickle: the
    # margin is for a loaded machine, and still far below what no deadline would take.
    assert time.monotonic() - start < 2 * DEADLINE_FACTOR * cfg.timeout + 10.0


def test_loopback_refused_without_allowed_networks(servers, base):
    main = servers[0]
    result = fetch(f"{base}/good.jpg?no-allow", DownloadConfig(timeout=0.5))
    assert result.reason == "refused_address" and not result.transient
    assert main.hits["/good.jpg?no-allow"] == 0


@pytest.mark.parametrize(
    "ip",
    [
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "127.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "169.254.169.254",
        "fe80::1",
        "fec0::1",
        "fd00::1",
        "100.64.0.1",  # carrier-grade NAT
        "240.0.0.1",
        "255.255.255.255",
        "64:ff9b::a9fe:a9fe",  # NAT64 form of 169.254.169.254
        "2002:a00:1::",  # 6to4 form of 10.0.0.1
        "not-an-ip",
    ],
)
def test_policy_blocks(ip):
    assert not address_allowed(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "1.1.1.1"])
def test_policy_allows_public(ip):
    assert address_allowed(ip)


def test_policy_allowed_networks():
    nets = ["127.0.0.1/32"]
    assert address_allowed("127.0.0.1", nets)
    assert address_allowed("::ffff:127.0.0.1", nets)
    assert not address_allowed("127.0.0.2", nets)
    assert not address_allowed("10.0.0.1", nets)
    assert address_allowed("10.1.2.3", ["10.0.0.0/8"])


@pytest.fixture(scope="module")
def tls_server():
    """An https server with a certificate for the name "localhost" only (no IP address)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(cert_pem + key_pem)
        f.flush()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(f.name)
    server_names = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: server_names.append(server_name)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.lock, server.hits, server.user_agents = threading.Lock(), Counter(), []
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    _serve(server)
    yield server, cert_pem.decode(), server_names
    server.shutdown()
    server.server_close()


def test_https_checks_the_url_host_while_connecting_to_the_checked_ip(tls_server, monkeypatch):
    server, ca_pem, server_names = tls_server
    client_ctx = ssl.create_default_context(cadata=ca_pem)
    client_ctx.sslsocket_class = fetching._DeadlineSSLSocket
    monkeypatch.setattr(fetching, "_tls_context", lambda: client_ctx)
    port = server.server_address[1]
    # Where "localhost" also resolves to ::1, that address must be allowed too.
    cfg = dataclasses.replace(CFG, allowed_networks=("127.0.0.1/32", "::1/128"))

    ok = fetch(f"https://localhost:{port}/good.jpg", cfg)
    assert ok.reason is None and ok.body == GOOD_JPG
    assert server_names[-1] == "localhost"  # SNI carries the URL's host, not the IP

    # The same server by IP: the certificate does not name it, so verification fails.
    assert fetch(f"https://127.0.0.1:{port}/good.jpg", cfg).reason == "tls_error"

    start = time.monotonic()
    assert fetch(f"https://localhost:{port}/stall", cfg).reason == "timeout"
    assert time.monotonic() - start < DEADLINE_FACTOR * CFG.timeout + 1.0
