"""Safe image loading for serving and evaluation: bounded, allow-listed, local only.

    from fastllava.image_io import load_image
    img = load_image("data:image/png;base64,...")             # or bytes, a path, raw base64, a PIL image
    img = load_image(path, allowed_dir="/data/images", max_pixels=16_000_000)

What it guards against, in the order it checks:

- remote fetching: `http(s)://` strings are refused (the caller fetches, with its own limits);
- path traversal: with `allowed_dir`, a path must resolve (symlinks followed) inside it;
- format confusion: only decoders in `allowed_formats` are tried (a TIFF or ICO is named and refused);
- decompression bombs: the pixel count is read from the header and checked *before* `.load()` decodes;
  PIL's own bomb warning/error (`Image.MAX_IMAGE_PIXELS`) is turned into our error as well;
- corrupt or truncated files: decoding errors become `ImageLoadError`.

Every failure is an `ImageLoadError` (a `ValueError`) whose message names the problem.
The result is RGB via `.convert("RGB")`, as LLaVA's `load_image` does (alpha is dropped, not composited).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["ImageLoadError", "load_image", "DEFAULT_MAX_PIXELS", "DEFAULT_ALLOWED_FORMATS"]

# 64 Mpx (e.g. 8192 x 8192): above any camera photo, below PIL's own warning limit (~89.5 Mpx), so the
# default cap is always the one that triggers. A cap above 2 * Image.MAX_IMAGE_PIXELS is still bounded by PIL.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Formats PIL reports under another name than the one a user would allow.
_FORMAT_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEG (most phone photos) is opened by the JPEG decoder

# Magic numbers, only to *name* a refused format in the error (nothing is decoded with them).
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"icns", "ICNS"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


class ImageLoadError(ValueError):
    """An image could not be loaded safely; the message says why."""


def load_image(
    source: str | bytes | bytearray | os.PathLike | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: tuple[str, ...] | list[str] = DEFAULT_ALLOWED_FORMATS,
    allowed_dir: str | os.PathLike | None = None,
) -> Image.Image:
    """Load one image as RGB from bytes, a `data:` URL, raw base64, a local path or a PIL image.

    `max_pixels`: cap on width * height, checked from the header before decoding.
    `allowed_formats`: PIL format names whose decoders may run.
    `allowed_dir`: when given, local paths must resolve inside this directory.
    """
    allowed = tuple(f.upper() for f in allowed_formats)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), max_pixels, allowed, origin="image bytes")
    if isinstance(source, os.PathLike):
        return _decode_path(Path(source), max_pixels, allowed, allowed_dir)
    if not isinstance(source, str):
        raise ImageLoadError(f"unsupported image source type {type(source).__name__}")

    text = source.strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I) and not text.lower().startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise ImageLoadError(
            f"remote fetching is not supported here ({scheme}:// URL given); download the image and pass its "
            "bytes, a data: URL or a local path"
        )
    if text[:5].lower() == "data:":
        return _decode(_data_url_bytes(text), max_pixels, allowed, origin="data: URL")
    if text.lower().startswith("file://"):
        return _decode_path(Path(text[len("file://") :]), max_pixels, allowed, allowed_dir)
    # LLaVA's workers receive bare base64 strings. A string that is strict base64 of >= 64 characters is
    # taken as image data (a real path almost always has a '.', '_' or '-'); anything else is a path.
    raw = _maybe_base64(text)
    if raw is not None:
        return _decode(raw, max_pixels, allowed, origin="base64 string")
    return _decode_path(Path(text), max_pixels, allowed, allowed_dir)


def _data_url_bytes(url: str) -> bytes:
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageLoadError("malformed data: URL (expected data:<mime>;base64,<payload>)")
    mime = m.group("mime").lower()
    if mime and not mime.startswith("image/"):
        raise ImageLoadError(f"data: URL has media type {mime!r}, not an image")
    payload = url[m.end() :]
    if not m.group("b64"):
        raise ImageLoadError("data: URL is not base64-encoded (';base64' missing)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(f"data: URL has invalid base64 payload: {exc}") from exc


def _maybe_base64(text: str) -> bytes | None:
    if len(text) < 64 or not _B64_CHARS.match(text):
        return None
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_path(path: Path, max_pixels: int, allowed: tuple[str, ...], allowed_dir) -> Image.Image:
    resolved = Path(os.path.realpath(path))
    if allowed_dir is not None:
        root = Path(os.path.realpath(allowed_dir))
        if resolved != root and root not in resolved.parents:
            raise ImageLoadError(f"path {str(path)!r} is outside the allowed directory {str(root)!r}")
    if not resolved.is_file():
        raise ImageLoadError(f"image file not found: {str(path)!r}")
    with open(resolved, "rb") as f:
        data = f.read()
    return _decode(data, max_pixels, allowed, origin=f"file {str(path)!r}")


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _check_pixels(size: tuple[int, int], max_pixels: int, origin: str = "image") -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageLoadError(f"{origin}: image is {w}x{h} = {w * h} pixels, over the pixel cap of {max_pixels}")


def _decode(data: bytes, max_pixels: int, allowed: tuple[str, ...], origin: str) -> Image.Image:
    if not data:
        raise ImageLoadError(f"{origin} is empty")
    sniffed = _sniff(data)
    if sniffed is not None and sniffed not in allowed:
        raise ImageLoadError(f"{origin}: image format {sniffed} is not allowed (allowed: {', '.join(allowed)})")
    Image.init()  # register every plugin so Image.OPEN names them all
    formats = sorted(f for f in {*allowed, *(k for k, v in _FORMAT_ALIASES.items() if v in allowed)} if f in Image.OPEN)
    if not formats:
        raise ImageLoadError(f"none of the allowed formats {allowed} is a format PIL can open")
    try:
        # Turn PIL's bomb *warning* into an exception too, so nothing past its limit is ever decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)  # lazy: header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL checks the header size against Image.MAX_IMAGE_PIXELS inside open(); its message has the count.
        cap = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageLoadError(f"{origin}: image is over the pixel cap of {cap} ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{origin}: cannot identify image data (corrupt or unsupported format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise ImageLoadError(f"{origin}: corrupt image header ({exc})") from exc

    fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
    if fmt not in allowed:
        raise ImageLoadError(f"{origin}: image format {img.format} is not allowed (allowed: {', '.join(allowed)})")
    _check_pixels(img.size, max_pixels, origin)
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError) as exc:
        raise ImageLoadError(f"{origin}: corrupt or truncated {fmt} image ({exc})") from exc
