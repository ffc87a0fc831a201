"""Download stage: safe fetching, image validation and img2dataset's resizing.

This is the only module that imports img2dataset. Fetching is done here rather than with
img2dataset's urllib downloader because a URL list scraped from the web is untrusted input:
URLs may point at cloud metadata endpoints or the cluster's own services, redirect into them,
or resolve to them only on the second DNS lookup. So every hop is resolved once, checked, and
connected to at exactly the address that was checked.

Failures carry a short machine-readable ``reason`` (counted in stats.json):
bad_scheme, bad_url, dns_error, refused_address, too_many_redirects, http_<status>,
opted_out, too_large, empty_body, timeout, connection_error, tls_error, bad_response,
not_an_image, too_many_pixels, truncated_image, decode_error, internal_error.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import importlib
import importlib.util
import io
import ipaddress
import math
import os
import socket
import ssl
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import DownloadConfig, from_dict

# A request (all its redirect hops) may take this many per-operation timeouts in total:
# a server trickling a byte per second cannot hold a thread for long.
DEADLINE_FACTOR = 3
BACKOFF_S = 0.1  # first retry waits 0.1 s, then 0.2 s, ...: transient blips, not rate limits
_CHUNK = 64 * 1024
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Resizer silences stdout/stderr by swapping the process's file descriptors 1 and 2; two
# threads doing that at once can leave them pointing at /dev/null for good.
_RESIZER_LOCK = threading.Lock()


def user_agent(token: str | None) -> str:
    """img2dataset's User-Agent, naming our token so sites can opt out by it."""
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if token:
        agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return agent


@functools.cache
def _img2dataset():
    """img2dataset's downloader and resizer modules, without its package __init__.

    ``import img2dataset`` loads its whole CLI (writers, webdataset, torch): 5-15 s in every
    download actor, for two functions. The two modules are loaded under a bare package
    instead, which is then removed, so a later ``import img2dataset`` still gets the real one.
    albumentations checks PyPI for updates on import unless told not to.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if "img2dataset" in sys.modules:  # already imported in full
        from img2dataset import downloader, resizer

        return downloader, resizer
    package = types.ModuleType("img2dataset")
    package.__path__ = list(importlib.util.find_spec("img2dataset").submodule_search_locations)
    sys.modules["img2dataset"] = package
    try:
        downloader = importlib.import_module("img2dataset.downloader")
        resizer = importlib.import_module("img2dataset.resizer")
    finally:
        del sys.modules["img2dataset"]
    return downloader, resizer


# ---------------------------------------------------------------------------- address policy


@functools.lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _reached_forms(addr: Any) -> list[Any]:
    """The addresses a packet to ``addr`` really reaches: IPv6 forms can embed an IPv4 one."""
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return [addr.ipv4_mapped]
        if addr in _NAT64:  # DNS64/NAT64 networks translate these to the embedded IPv4
            return [ipaddress.IPv4Address(int(addr) & 0xFFFF_FFFF)]
        if addr.sixtofour is not None:
            return [addr, addr.sixtofour]
    return [addr]


def _is_public(addr: Any) -> bool:
    # is_global alone lets multicast (and IPv6 site-local) through, so those are explicit.
    return not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or (addr.version == 6 and addr.is_site_local)
        or not addr.is_global
    )


def address_allowed(ip: str, allowed_networks: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether fetching from ``ip`` is allowed: public addresses, or ones inside an allowed CIDR."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    nets = _networks(tuple(allowed_networks))
    return all(_is_public(a) or any(a in n for n in nets) for a in _reached_forms(addr))


# ------------------------------------------------------------------------------ fetching


@dataclass(frozen=True)
class FetchResult:
    body: bytes | None = None
    reason: str | None = None  # short and machine-readable; None on success
    error: str | None = None  # human-readable detail
    transient: bool = False  # worth retrying: timeouts, 5xx, 429, connection errors


class _Failure(Exception):
    def __init__(self, reason: str, error: object, transient: bool = False):
        super().__init__(str(error))
        self.reason = reason
        self.transient = transient


class _DeadlineMixin:
    """Caps every receive by what is left of the request's deadline, not just per operation."""

    deadline = math.inf
    op_timeout: float | None = None

    def recv_into(self, *args, **kwargs):
        self.settimeout(_op_timeout(self.op_timeout, self.deadline))
        return super().recv_into(*args, **kwargs)


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


def _op_timeout(timeout: float | None, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("request deadline exceeded")
    return left if timeout is None else min(timeout, left)


def _open_socket(addresses, timeout: float, deadline: float) -> socket.socket:
    """Connect to one of the checked addresses: the host name is never resolved again."""
    last_error: OSError = OSError("no address")
    for family, sockaddr in addresses:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.op_timeout, sock.deadline = timeout, deadline
        try:
            sock.settimeout(_op_timeout(timeout, deadline))
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise last_error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, port, addresses, timeout, deadline):
        super().__init__(host, port, timeout=timeout)
        self.addresses, self.deadline = addresses, deadline

    def connect(self):
        self.sock = _open_socket(self.addresses, self.timeout, self.deadline)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Made once, on first https use: loading the CA certificates takes a while.
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, addresses, timeout, deadline):
        super().__init__(host, port, timeout=timeout, context=_tls_context())
        self.addresses, self.deadline = addresses, deadline

    def connect(self):
        sock = _open_socket(self.addresses, self.timeout, self.deadline)
        # SNI and the certificate check use the URL's host name, not the address connected to.
        tls = _tls_context().wrap_socket(sock, server_hostname=self.host)
        tls.op_timeout, tls.deadline = self.timeout, self.deadline
        self.sock = tls


def _resolve(host: str, port: int, allowed_networks: tuple[str, ...]) -> list[tuple[int, Any]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise _Failure("dns_error", err, transient=err.errno == socket.EAI_AGAIN) from err
    except (UnicodeError, ValueError) as err:  # not a valid host name at all
        raise _Failure("dns_error", err) from err
    addresses = [(f, sa) for f, _, _, _, sa in infos if f in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise _Failure("dns_error", f"no IP address for {host}")
    # A name resolving to any non-public address is refused outright, even if it has public
    # ones too: that mix is what a DNS-rebinding attacker serves.
    for _, sockaddr in addresses:
        if not address_allowed(sockaddr[0], allowed_networks):
            raise _Failure("refused_address", f"{host} resolves to {sockaddr[0]}")
    return addresses


def _get(url: str, cfg: DownloadConfig, deadline: float) -> tuple[bytes | None, str | None]:
    """One hop: the body, or the Location to follow."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Failure("bad_scheme", f"scheme {scheme or '(none)'!r} is not http or https")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError as err:
        raise _Failure("bad_url", err) from err
    if not host:
        raise _Failure("bad_url", "no host in URL")
    addresses = _resolve(host, port, cfg.allowed_networks)
    # Percent-encode what http.client refuses (spaces, non-ASCII, controls); keep the rest as is.
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~") + (
        "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?") if parts.query else ""
    )
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, port, addresses, cfg.timeout, deadline)
    try:
        conn.request("GET", target, headers={"User-Agent": user_agent(cfg.user_agent_token)})
        resp = conn.getresponse()
        location = resp.getheader("Location")
        if resp.status in _REDIRECT_STATUSES and location:
            return None, location
        if not 200 <= resp.status < 300:
            transient = resp.status >= 500 or resp.status == 429
            raise _Failure(f"http_{resp.status}", f"{resp.status} {resp.reason}", transient)
        directives = cfg.disallowed_header_directives
        if directives:
            token = (cfg.user_agent_token or "").strip().lower() or None
            wanted = {d.strip().lower() for d in directives}
            if _img2dataset()[0].is_disallowed(resp.headers, token, wanted):
                raise _Failure("opted_out", "use disallowed by an X-Robots-Tag directive")
        if resp.length is not None and resp.length > cfg.max_bytes:
            raise _Failure("too_large", f"Content-Length {resp.length} > {cfg.max_bytes}")
        chunks, size = [], 0
        while chunk := resp.read1(_CHUNK):  # read1: one socket read, so deadlines bite
            size += len(chunk)
            if size > cfg.max_bytes:
                raise _Failure("too_large", f"body exceeds {cfg.max_bytes} bytes")
            chunks.append(chunk)
        if resp.length:  # the server closed before sending all it announced
            raise http.client.IncompleteRead(b"".join(chunks), resp.length)
        return b"".join(chunks), None
    finally:
        conn.close()


def _fetch_once(url: str, cfg: DownloadConfig) -> FetchResult:
    deadline = time.monotonic() + DEADLINE_FACTOR * cfg.timeout
    try:
        for _ in range(cfg.max_redirects + 1):
            body, location = _get(url, cfg, deadline)
            if location is None:
                if not body:
                    return FetchResult(reason="empty_body", error="empty response body")
                return FetchResult(body=body)
            url = urljoin(url, location)  # the next hop is checked like the first
        raise _Failure("too_many_redirects", f"more than {cfg.max_redirects} redirects")
    except _Failure as err:
        return FetchResult(reason=err.reason, error=str(err), transient=err.transient)
    except TimeoutError as err:
        return FetchResult(reason="timeout", error=str(err) or "timed out", transient=True)
    except ssl.SSLError as err:
        return FetchResult(reason="tls_error", error=str(err))
    except (ConnectionError, http.client.IncompleteRead) as err:
        return FetchResult(reason="connection_error", error=repr(err), transient=True)
    except http.client.HTTPException as err:  # a malformed response
        return FetchResult(reason="bad_response", error=repr(err))
    except OSError as err:  # unreachable network or host
        return FetchResult(reason="connection_error", error=str(err), transient=True)


def fetch(url: str, cfg: DownloadConfig) -> FetchResult:
    """GET ``url`` safely (see the module docstring); transient failures are retried."""
    attempt = 0
    while True:
        result = _fetch_once(url, cfg)
        if not result.transient or attempt >= cfg.retries:
            return result
        time.sleep(BACKOFF_S * 2**attempt)
        attempt += 1


# ------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageResult:
    jpg: bytes | None = None  # encoded in cfg.encode_format, whatever the column name says
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None  # of the downloaded bytes, for exact-duplicate filtering
    phash: str | None = None  # perceptual hash, for near-duplicates and decontamination
    reason: str | None = None
    error: str | None = None


def make_resizer(cfg: DownloadConfig) -> Any:
    # min_image_size=0: size and aspect filters live in pipeline.filters, counted there.
    return _img2dataset()[1].Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        min_image_size=0,
    )


def _resized_shape(resizer: Any, width: int, height: int) -> tuple[int, int] | None:
    """(height, width) img2dataset's Resizer scales a ``width`` x ``height`` image to before
    cropping or padding, when that is a downscale; None when it keeps the size or upscales.

    albumentations' SmallestMaxSize / LongestMaxSize arithmetic (scale = size / side, each side
    rounded), computed here: building the transforms per image costs more than resizing.
    """
    mode = resizer.resize_mode.name
    if mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    elif mode in ("border", "keep_ratio_largest"):
        side = max(width, height)
    else:
        return None
    if side <= resizer.image_size:
        return None
    scale = resizer.image_size / side
    return max(1, round(height * scale)), max(1, round(width * scale))


@functools.cache
def _pad_to_square(size: int) -> Any:
    """The Resizer's border padding (white, centred), built once per size."""
    import albumentations as A
    import cv2

    return A.PadIfNeeded(
        min_height=size,
        min_width=size,
        border_mode=cv2.BORDER_CONSTANT,
        fill=[255, 255, 255],  # the Resizer's white border (it passes the older `value`)
        p=1.0,
    )


def _fast_resize(im: Image.Image, resizer: Any) -> tuple[bytes, int, int, Image.Image] | None:
    """img2dataset's resize of a JPEG, decoded at reduced scale: (encoded, w, h, decoded).

    libjpeg scales by 1/2, 1/4 or 1/8 while decoding (an averaging of DCT blocks), to the
    smallest size still at least the target; the Resizer's own interpolation then takes it to
    exactly the size it would give from the full-size decode, and the crop or padding and the
    encoding are the Resizer's. None when it would not save work: not a JPEG, not RGB or grey
    (CMYK conversions differ from OpenCV's), or not a downscale by at least 2. It runs outside
    the Resizer's stdout-swapping lock, so an actor's threads resize in parallel.
    """
    import cv2

    width, height = im.size
    shape = _resized_shape(resizer, width, height)
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or shape is None:
        return None
    if min(width / shape[1], height / shape[0]) < 2:
        return None
    im.draft(im.mode, (shape[1], shape[0]))
    im.load()
    pixels = np.asarray(im)
    if pixels.ndim == 3:
        pixels = pixels[:, :, ::-1]  # OpenCV's channel order
    img = cv2.resize(pixels, (shape[1], shape[0]), interpolation=resizer.downscale_interpolation)
    size = resizer.image_size
    if resizer.resize_mode.name == "center_crop":  # albumentations' CenterCrop coordinates
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[top : top + size, left : left + size]
    elif resizer.resize_mode.name == "border":
        img = _pad_to_square(size)(image=img)["image"]
    ok, encoded = cv2.imencode(f".{resizer.encode_format}", img, params=resizer.encode_params)
    if not ok:
        raise ValueError("encoding failed")
    return encoded.tobytes(), img.shape[1], img.shape[0], im


def _phash_of(body: bytes) -> str:
    from pipeline.filters import perceptual_hash

    with Image.open(io.BytesIO(body)) as im:
        im.draft("RGB", (64, 64))  # the hash looks at 32x32: no need for a full-size decode
        return perceptual_hash(im)


def process_image(
    body: bytes, cfg: DownloadConfig, resizer: Any, perceptual_hash: bool = False
) -> ImageResult:
    """Validate downloaded bytes from their header, then resize them with img2dataset's
    semantics (reduced-scale JPEG decoding when ``cfg.fast_resize``); optionally the pHash."""
    try:
        im = Image.open(io.BytesIO(body))  # parses the header only, decodes nothing
        fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError as err:
        return ImageResult(reason="too_many_pixels", error=str(err))
    except Exception as err:  # PIL raises many types on garbage: it is all "not an image"
        return ImageResult(reason="not_an_image", error=f"{type(err).__name__}: {err}")
    with im:
        if width * height > cfg.max_pixels:  # refused before decoding: decompression bombs
            return ImageResult(
                reason="too_many_pixels", error=f"{width}x{height} > {cfg.max_pixels} pixels"
            )
        # OpenCV decodes a cut-off JPEG without complaint, grey below the cut.
        if fmt in ("JPEG", "MPO") and not body.rstrip(b"\x00 \t\r\n").endswith(b"\xff\xd9"):
            return ImageResult(reason="truncated_image", error="JPEG has no end-of-image marker")
        fast = None
        if cfg.fast_resize:
            try:
                fast = _fast_resize(im, resizer)
            except Exception as err:  # what PIL cannot decode, OpenCV will not either
                return ImageResult(reason="decode_error", error=f"{type(err).__name__}: {err}")
        if fast is not None:
            encoded, w, h, decoded = fast
            ow, oh = width, height
            phash = _perceptual_hash(decoded) if perceptual_hash else None
        else:
            with _RESIZER_LOCK:
                encoded, w, h, ow, oh, err = resizer(io.BytesIO(body))
            if err is not None or encoded is None:
                return ImageResult(reason="decode_error", error=str(err))
            phash = _phash_of(body) if perceptual_hash else None
    return ImageResult(
        jpg=encoded,
        width=w,
        height=h,
        original_width=ow,
        original_height=oh,
        sha256=hashlib.sha256(body).hexdigest(),
        phash=phash,
    )


def _perceptual_hash(im: Image.Image) -> str:
    from pipeline.filters import perceptual_hash

    return perceptual_hash(im)


# --------------------------------------------------------------------------- the stage

_IMAGE_COLUMNS = (
    "jpg",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "phash",
)
_INT_COLUMNS = ("width", "height", "original_width", "original_height")


class DownloadStage:
    """Ray Data callable: fetch, validate and resize each live row of a pandas batch.

    Rows whose ``reason`` is already set pass through untouched. A row that fails here gets
    stage="download", its reason and error, and jpg=None.
    """

    def __init__(self, config: dict, perceptual_hashes: bool = False):
        self.cfg = from_dict(DownloadConfig, config)
        self.perceptual_hashes = perceptual_hashes
        _networks(self.cfg.allowed_networks)  # a malformed CIDR fails here, not once per row
        self.resizer = make_resizer(self.cfg)
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the threads and actors, not OpenCV
        self.pool = ThreadPoolExecutor(self.cfg.thread_count)  # fetching is I/O bound

    def download(self, url: str) -> ImageResult:
        if not isinstance(url, str) or not url:
            return ImageResult(reason="bad_url", error=f"not a URL: {url!r}")
        try:
            fetched = fetch(url, self.cfg)
            if fetched.body is None:
                return ImageResult(reason=fetched.reason, error=fetched.error)
            return process_image(fetched.body, self.cfg, self.resizer, self.perceptual_hashes)
        except Exception as err:  # one odd URL must not fail a whole batch
            return ImageResult(reason="internal_error", error=f"{type(err).__name__}: {err}")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        out = batch.copy()
        for col in ("stage", "reason", "error"):
            if col not in out.columns:
                out[col] = None
        live_rows = np.flatnonzero(out["reason"].isna().to_numpy())
        results = self.pool.map(self.download, out["url"].to_numpy()[live_rows])  # in order

        n = len(out)
        cols = {c: [None] * n for c in _IMAGE_COLUMNS}
        cols.update({c: out[c].astype(object).tolist() for c in ("stage", "reason", "error")})
        for i, res in zip(live_rows, results, strict=True):
            if res.reason is not None:
                updates = {"stage": "download", "reason": res.reason, "error": res.error}
            else:
                updates = {c: getattr(res, c) for c in _IMAGE_COLUMNS}
            for c, value in updates.items():
                cols[c][i] = value
        for c, values in cols.items():
            out[c] = pd.Series(
                values, index=out.index, dtype="Int64" if c in _INT_COLUMNS else object
            )
        # Per-row share of the batch's wall time, so the caller can sum the stage's time.
        out["download_seconds"] = (time.perf_counter() - start) / max(n, 1)
        return out
