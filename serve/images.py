"""Turning a request's image URLs into PIL images, within limits, before anything is decoded.

    policy = ImagePolicy(max_images=8, allow_remote=False, allowed_local_dir=None)
    image = await fetch_image(ref.url, policy, param=ref.param)     # PIL RGB, or APIError(400)

- ``data:image/...;base64,`` URLs: the payload size is checked from its length, then ``load_image`` checks
  the format allow-list and the pixel count from the header (decompression bombs) before decoding;
- ``http(s)://``: refused unless ``allow_remote``; then the host must match ``remote_hosts`` (if given) and
  every address it resolves to must be public (no loopback, private, link-local, multicast or reserved
  ranges: no SSRF into the serving network); no redirects, a timeout and a byte cap;
- ``file://`` and plain paths: refused unless ``allowed_local_dir`` is set, then they must resolve inside it.

Decoding runs in a thread so the event loop keeps serving. Error messages never contain image bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from fastllava.image_io import DEFAULT_ALLOWED_FORMATS, ImageLoadError, load_image

from .protocol import APIError, bad_request


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


async def fetch_image(url: str, policy: ImagePolicy, param: str = "image_url") -> Image.Image:
    """One image URL of a request as an RGB PIL image; a 400 ``APIError`` for anything refused."""
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    try:
        if scheme == "data":
            payload = len(url) - url.find(",") - 1
            if payload * 3 // 4 > policy.max_image_bytes:
                raise bad_request(f"'{param}': image is over {policy.max_image_bytes} bytes", param, "image_too_large")
            return await asyncio.to_thread(_load, url, policy)
        if scheme in ("http", "https"):
            if not policy.allow_remote:
                raise bad_request(
                    f"'{param}': remote image URLs are disabled on this server; send the image as a data: URL",
                    param,
                    "remote_images_disabled",
                )
            data = await _fetch_remote(url, policy, param)
            return await asyncio.to_thread(_load, data, policy)
        if scheme in ("file", ""):
            if policy.allowed_local_dir is None:
                raise bad_request(
                    f"'{param}': local image paths are disabled on this server; send the image as a data: URL",
                    param,
                    "local_images_disabled",
                )
            path = url[len("file://") :] if scheme == "file" else url
            return await asyncio.to_thread(_load, path, policy, policy.allowed_local_dir)
        raise bad_request(f"'{param}': unsupported URL scheme {scheme[:16]!r} (use data:, http(s): or a path)", param)
    except ImageLoadError as e:
        raise bad_request(f"'{param}': {e}", param, "invalid_image") from e


async def fetch_images(refs, policy: ImagePolicy) -> list[Image.Image]:
    """All images of a request, in order (count checked by the caller before this)."""
    out = []
    for ref in refs:
        out.append(await fetch_image(ref.url, policy, ref.param))
    return out


__all__ = ["APIError", "ImagePolicy", "check_public_addresses", "fetch_image", "fetch_images", "host_allowed"]
