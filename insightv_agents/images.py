"""Image normalisation and validation.

Every image a user hands to a graph goes through :func:`load_images` once, before any model
is called. It comes out as a ``data:`` URL string: checkpoint-safe, the format
OpenAI-compatible servers (vLLM) take as-is, and decodable by in-process backends.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, TypeAlias

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from insightv_agents.errors import InvalidInputError

ImageItem: TypeAlias = str | bytes | bytearray | Path | Image.Image
ImageInput: TypeAlias = ImageItem | Sequence[ImageItem]
"""A path, raw bytes, a ``PIL.Image``, a base64 string, a data URL, an http(s) URL (when
allowed), or a list of these."""

_KEEP_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg"}
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_DATA_URL_RE = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[^;,]*)*?;base64,", re.I)


class ImagePolicy(BaseModel):
    """What images a graph accepts. The defaults are safe for untrusted input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_urls: bool = False
    """Fetch http(s) URLs. Off by default: a URL in the input is refused."""
    allow_private_urls: bool = False
    """Allow URLs that resolve to loopback, private or link-local addresses (SSRF guard)."""
    max_images: int = Field(8, ge=1, le=64)
    max_bytes: int = Field(20 * 2**20, ge=1)
    """Largest encoded image accepted, in bytes."""
    max_pixels: int = Field(40_000_000, ge=1)
    """Largest decoded image accepted (width x height); guards against decompression bombs."""
    url_timeout: float = Field(10.0, gt=0, le=300)


def load_images(image: Any, policy: ImagePolicy | None = None) -> list[str]:
    """Validate ``image`` (one item or a list) and return one ``data:`` URL per image.

    Raises:
        InvalidInputError: naming what is wrong with which image.
    """
    policy = policy or ImagePolicy()
    if image is None:
        raise InvalidInputError("`image` is required: pass a path, bytes, a PIL image, "
                                "base64 text, a data URL, or a list of these.", field="image")
    items = list(image) if isinstance(image, list | tuple) else [image]
    if not items:
        raise InvalidInputError("`image` is an empty list: pass at least one image.", field="image")
    if len(items) > policy.max_images:
        raise InvalidInputError(f"{len(items)} images given; at most {policy.max_images} are "
                                "allowed (ImagePolicy.max_images).", field="image")
    urls = []
    for index, item in enumerate(items):
        where = "image" if len(items) == 1 else f"image[{index}]"
        try:
            urls.append(_load_one(item, policy))
        except InvalidInputError as err:
            raise InvalidInputError(f"{where}: {err}", field="image") from err
    return urls


def data_url_bytes(url: str) -> bytes:
    """The decoded payload of a base64 ``data:`` URL."""
    match = _DATA_URL_RE.match(url)
    if not match:
        raise InvalidInputError("not a base64 data URL (expected 'data:<mime>;base64,...').",
                                field="image")
    return _b64decode(url[match.end():])


def open_image(item: Any, policy: ImagePolicy | None = None) -> Image.Image:
    """Validate one image (any form :func:`load_images` takes) and decode it, once, to RGB.

    For backends that need pixels rather than a data URL.

    Raises:
        InvalidInputError: as :func:`load_images` does.
    """
    policy = policy or ImagePolicy()
    if isinstance(item, Image.Image):
        _check_size(item.width, item.height, policy)
        return _to_rgb(item)
    return _to_rgb(_decode(_source_bytes(item, policy), policy))


def redact_images(value: Any) -> Any:
    """A copy of ``value`` with image payloads replaced by short placeholders (for traces/logs)."""
    if isinstance(value, str):
        return f"<image: {len(value)} chars>" if value.startswith("data:") else value
    if isinstance(value, bytes | bytearray):
        return f"<bytes: {len(value)}>"
    if isinstance(value, Image.Image):
        return f"<PIL image {value.width}x{value.height}>"
    if isinstance(value, dict):
        return {key: redact_images(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_images(item) for item in value]
    return value


def _load_one(item: Any, policy: ImagePolicy) -> str:
    if isinstance(item, Image.Image):
        return _from_pil(item, policy)
    data = _source_bytes(item, policy)
    img = _decode(data, policy)
    mime = _KEEP_AS_IS.get(img.format or "")
    if mime and img.mode in ("RGB", "L") and not getattr(img, "is_animated", False):
        return _data_url(data, mime)
    return _from_pil(img, policy)


def _source_bytes(item: Any, policy: ImagePolicy) -> bytes:
    """The encoded image behind any accepted form other than a ``PIL.Image``."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, Path):
        return _read_path(item, policy)
    if not isinstance(item, str):
        raise InvalidInputError(f"unsupported type {type(item).__name__}: pass a path, bytes, "
                                "a PIL image, base64 text or a data URL.")
    text = item.strip()
    if not text:
        raise InvalidInputError("empty string: pass a path, base64 text or a data URL.")
    if text[:5].lower() == "data:":
        return data_url_bytes(text)
    scheme = urllib.parse.urlsplit(text).scheme.lower() if "://" in text[:12] else ""
    if scheme in ("http", "https"):
        return _fetch(text, policy)
    if scheme:
        raise InvalidInputError(f"URL scheme {scheme!r} is not supported (only http and https, "
                                "and only with ImagePolicy(allow_urls=True)).")
    if len(text) < 4096 and "\n" not in text:
        path = Path(text).expanduser()
        try:
            exists = path.exists()
        except OSError:  # a name too long for the file system: not a path
            exists = False
        if exists:
            return _read_path(path, policy)
    if len(text) >= 64 and _BASE64_RE.match(text):
        return _b64decode(text)
    if len(text) <= 256 and "\n" not in text:  # a path: worth quoting
        raise InvalidInputError(f"no such file {text!r} (and it is not base64 image data).")
    # Long text is most likely broken image data: never echoed into errors or logs.
    raise InvalidInputError(f"{len(text)} characters of text that are neither a file path "
                            "nor base64 image data.")


def _read_path(path: Path, policy: ImagePolicy) -> bytes:
    if not path.exists():
        raise InvalidInputError(f"no such file {str(path)[:200]!r}.")
    if not path.is_file():
        raise InvalidInputError(f"{str(path)[:200]!r} is not a regular file.")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise InvalidInputError(f"file {path.name!r} is {size} bytes; the limit is "
                                f"{policy.max_bytes} (ImagePolicy.max_bytes).")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidInputError(f"cannot read {str(path)[:200]!r}: {err.strerror}.") from err


def _b64decode(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInputError(f"invalid base64 image data ({err}).") from err


def _decode(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Open and fully decode ``data``, checking its size and pixel count before decoding."""
    if not data:
        raise InvalidInputError("the image data is empty (0 bytes).")
    if len(data) > policy.max_bytes:
        raise InvalidInputError(f"the image is {len(data)} bytes; the limit is "
                                f"{policy.max_bytes} (ImagePolicy.max_bytes).")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(BytesIO(data))
            _check_size(img.width, img.height, policy)
            img.load()
        except InvalidInputError:
            raise
        except UnidentifiedImageError as err:
            raise InvalidInputError("the data is not an image in a format Pillow can read "
                                    "(corrupt, or not an image file).") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InvalidInputError(f"the image is too large to decode safely ({err}).") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise InvalidInputError(f"the image is corrupt or truncated ({err}).") from err
    return img


def _check_size(width: int, height: int, policy: ImagePolicy) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"the image has zero size ({width}x{height}).")
    if width * height > policy.max_pixels:
        raise InvalidInputError(f"the image is {width}x{height} = {width * height} pixels; the "
                                f"limit is {policy.max_pixels} (ImagePolicy.max_pixels).")


def _from_pil(img: Image.Image, policy: ImagePolicy) -> str:
    _check_size(img.width, img.height, policy)
    try:
        rgb = _to_rgb(img)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"the image cannot be converted to RGB ({err}).") from err
    buffer = BytesIO()
    rgb.save(buffer, format="PNG")
    return _data_url(buffer.getvalue(), "image/png")


def _to_rgb(img: Image.Image) -> Image.Image:
    if getattr(img, "is_animated", False):
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = img.convert("I").point(lambda value: value / 256).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_urls:
        raise InvalidInputError("image URLs are not allowed: download the image and pass the "
                                "file, or set ImagePolicy(allow_urls=True).")
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise InvalidInputError(f"URL {url[:200]!r} has no host.")
    if not policy.allow_private_urls:
        _refuse_private(host)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=policy.url_timeout) as response:
            data: bytes = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise InvalidInputError(f"cannot fetch {url[:200]!r}: {err}.") from err
    if len(data) > policy.max_bytes:
        raise InvalidInputError(f"the image at {url[:200]!r} is larger than "
                                f"{policy.max_bytes} bytes (ImagePolicy.max_bytes).")
    return data


def _refuse_private(host: str) -> None:
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as err:
        raise InvalidInputError(f"cannot resolve host {host!r}: {err}.") from err
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise InvalidInputError(f"host {host!r} resolves to the non-public address {ip}; "
                                    "set ImagePolicy(allow_private_urls=True) to allow it.")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: a redirect could lead to an address the SSRF check never saw."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        raise InvalidInputError("the image URL redirects; pass the final URL instead.")
