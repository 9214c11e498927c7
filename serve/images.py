"""Turning a request's image URLs into PIL images, within limits, before anything is decoded.

    policy = ImagePolicy(max_images=8, allow_remote=False, allowed_local_dir=None)
    image = await fetch_image(ref.url, policy, param=ref.param)     # PIL RGB, or APIError(400)

    sources = await image_sources(refs, policy)                     # bytes fetched, pixel counts peeked
    budget.take(n := sum(s.pixels for s in sources))                # or a 429 + Retry-After
    images = decode_sources(sources, policy)                        # in a worker thread, then budget.give(n)

- ``data:image/...;base64,`` URLs: the payload size is checked from its length, then ``load_image`` checks
  the format allow-list and the pixel count from the header (decompression bombs) before decoding;
- ``http(s)://``: refused unless ``allow_remote``; then the host must match ``remote_hosts`` (if given) and
  every address it resolves to must be public (no loopback, private, link-local, multicast or reserved
  ranges: no SSRF into the serving network); no redirects, a timeout and a byte cap;
- ``file://`` and plain paths: refused unless ``allowed_local_dir`` is set, then they must resolve inside it.

Decoding runs in a thread so the event loop keeps serving. Error messages never contain image bytes.

``PixelBudget`` bounds the pixels decoded at once across requests: a request reserves its images' pixel
counts, read from their headers (a PNG's first 33 bytes, a JPEG's first segments) before anything is
decoded, and a request that does not fit while others hold the budget gets a 429 with ``Retry-After``
instead of growing the worker's memory. Local paths count as ``max_pixels`` each (they are not read early).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import threading
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from fastllava.image_io import DEFAULT_ALLOWED_FORMATS, ImageLoadError, load_image

from .protocol import APIError, ImageRef, bad_request, overloaded


@dataclass
class ImagePolicy:
    max_images: int = 8  # per request; a multi-image LLaVA prompt rarely has more than a few
    max_pixels: int = 4096 * 4096  # per image, read from the header before decoding
    max_image_bytes: int = 10 * 1024 * 1024  # per image, encoded
    allowed_formats: tuple[str, ...] = DEFAULT_ALLOWED_FORMATS
    allow_remote: bool = False
    remote_hosts: tuple[str, ...] = ()  # allow-list ("example.com" also admits its subdomains); empty: any
    allowed_local_dir: str | None = None
    fetch_timeout: float = 10.0


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return not allowed or any(host == a or host.endswith("." + a) for a in (x.lower().strip(".") for x in allowed))


def check_public_addresses(addresses: list[str]) -> None:
    """Raise unless every address is a public (global) unicast address."""
    if not addresses:
        raise ValueError("the host does not resolve")
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ValueError(f"the host resolves to a non-public address ({ip}); fetching it is blocked")


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def _fetch_remote(url: str, policy: ImagePolicy, param: str) -> bytes:
    import httpx

    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host:
        raise bad_request(f"'{param}': URL has no host", param)
    if not host_allowed(host, policy.remote_hosts):
        raise bad_request(f"'{param}': host {host!r} is not in the allowed image hosts", param, "host_not_allowed")
    try:
        check_public_addresses(await _resolve(host, parts.port or (443 if parts.scheme == "https" else 80)))
    except (OSError, ValueError) as e:
        raise bad_request(f"'{param}': cannot fetch {host!r}: {e}", param, "image_fetch_blocked") from e
    try:
        async with httpx.AsyncClient(timeout=policy.fetch_timeout, follow_redirects=False) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise bad_request(f"'{param}': fetching the image returned HTTP {r.status_code}", param)
                data = bytearray()
                async for piece in r.aiter_bytes():
                    data += piece
                    if len(data) > policy.max_image_bytes:
                        raise bad_request(f"'{param}': image is over {policy.max_image_bytes} bytes", param)
                return bytes(data)
    except httpx.HTTPError as e:
        raise bad_request(f"'{param}': fetching the image failed ({type(e).__name__})", param) from e


def _load(source, policy: ImagePolicy, allowed_dir: str | None = None) -> Image.Image:
    return load_image(
        source, max_pixels=policy.max_pixels, allowed_formats=policy.allowed_formats, allowed_dir=allowed_dir
    )


@dataclass
class ImageSource:
    """One image of a request, fetched but not decoded: what ``load_image`` will read, and its size."""

    source: str | bytes  # a data: URL, fetched bytes, or an allowed local path
    pixels: int  # width * height from the header (an upper bound when the header was not read)
    param: str


_PEEK_CHARS = 1 << 16  # base64 characters decoded to read a header (48 KB: PNG, GIF, BMP, WEBP, most JPEGs)


def peek_pixels(data: bytes) -> int | None:
    """width * height from the image header in ``data`` (a prefix is enough), or None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb is refused by load_image; here we only want its size
            w, h = Image.open(io.BytesIO(data)).size
        return w * h
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def _data_url_pixels(url: str, cap: int) -> int:
    comma = url.find(",")
    head = url[comma + 1 : comma + 1 + _PEEK_CHARS]
    try:
        prefix = base64.b64decode(head[: len(head) // 4 * 4])
    except (binascii.Error, ValueError):
        return 0  # load_image refuses it, with the reason
    return min(peek_pixels(prefix) or cap, cap)


async def image_sources(refs, policy: ImagePolicy) -> list[ImageSource]:
    """The request's images fetched (remote ones downloaded, within limits) with their pixel counts read
    from the headers; nothing is decoded. Raises a 400 ``APIError`` for a URL that is refused."""
    out = []
    for ref in refs:
        url, param = ref.url.strip(), ref.param
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            payload = len(url) - url.find(",") - 1
            if payload * 3 // 4 > policy.max_image_bytes:
                raise bad_request(f"'{param}': image is over {policy.max_image_bytes} bytes", param, "image_too_large")
            out.append(ImageSource(url, _data_url_pixels(url, policy.max_pixels), param))
        elif scheme in ("http", "https"):
            if not policy.allow_remote:
                raise bad_request(
                    f"'{param}': remote image URLs are disabled on this server; send the image as a data: URL",
                    param,
                    "remote_images_disabled",
                )
            data = await _fetch_remote(url, policy, param)
            out.append(ImageSource(data, min(peek_pixels(data[:_PEEK_CHARS]) or policy.max_pixels, policy.max_pixels),
                                   param))  # fmt: skip
        elif scheme in ("file", ""):
            if policy.allowed_local_dir is None:
                raise bad_request(
                    f"'{param}': local image paths are disabled on this server; send the image as a data: URL",
                    param,
                    "local_images_disabled",
                )
            out.append(ImageSource(url[len("file://") :] if scheme == "file" else url, policy.max_pixels, param))
        else:
            raise bad_request(
                f"'{param}': unsupported URL scheme {scheme[:16]!r} (use data:, http(s): or a path)", param
            )
    return out


def decode_sources(sources: list[ImageSource], policy: ImagePolicy) -> list[Image.Image]:
    """Decode fetched images (blocking: call it in a worker thread); a 400 ``APIError`` naming the bad one."""
    out = []
    for s in sources:
        local = isinstance(s.source, str) and not s.source.startswith("data:")
        try:
            out.append(_load(s.source, policy, policy.allowed_local_dir if local else None))
        except ImageLoadError as e:
            raise bad_request(f"'{s.param}': {e}", s.param, "invalid_image") from e
    return out


class PixelBudget:
    """Pixels of images being decoded and preprocessed, across requests, under a cap.

    ``take(n)`` reserves ``n`` pixels or raises a 429 with ``Retry-After``; ``give(n)`` returns them (from
    the worker thread, when the images are preprocessed and dropped). A request larger than the whole
    budget still runs when nothing else holds any (so every valid request can run), never beside others."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.in_use = capacity, 0
        self._lock = threading.Lock()  # given back from worker threads

    def take(self, pixels: int) -> None:
        with self._lock:
            if self.in_use and self.in_use + pixels > self.capacity:
                raise overloaded(
                    f"the worker is decoding {self.in_use} image pixels (limit {self.capacity}); this request's "
                    f"{pixels} do not fit now, retry shortly",
                    status=429,
                )
            self.in_use += pixels

    def give(self, pixels: int) -> None:
        with self._lock:
            self.in_use -= pixels


async def fetch_image(url: str, policy: ImagePolicy, param: str = "image_url") -> Image.Image:
    """One image URL of a request as an RGB PIL image; a 400 ``APIError`` for anything refused."""
    sources = await image_sources([ImageRef(url, param)], policy)
    return (await asyncio.to_thread(decode_sources, sources, policy))[0]


__all__ = [
    "APIError",
    "ImagePolicy",
    "ImageSource",
    "PixelBudget",
    "check_public_addresses",
    "decode_sources",
    "fetch_image",
    "host_allowed",
    "image_sources",
    "peek_pixels",
]
