"""Image normalisation and validation.

Every image a user hands to a graph goes through :func:`load_images` once, before any model
is called. It comes out as a ``data:`` URL string: checkpoint-safe, the format
OpenAI-compatible servers (vLLM) take as-is, and decodable by in-process backends.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
import warnings
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, TypeAlias

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from insightv_agents.errors import ConfigError, InvalidInputError

ImageItem: TypeAlias = str | bytes | bytearray | Path | Image.Image
ImageInput: TypeAlias = ImageItem | Sequence[ImageItem]
"""A path, raw bytes, a ``PIL.Image``, a base64 string, a data URL, an http(s) URL (when
allowed), or a list of these."""

_KEEP_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg"}
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_DATA_URL_RE = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[^;,]*)*?;base64,", re.I)


class ImagePolicy(BaseModel):
    """What images a graph accepts. The defaults are safe for untrusted input.

    Raises:
        ConfigError: for an unknown option or a value out of range (naming the option and
            what it takes), from the constructor, ``model_validate`` and
            ``model_validate_json``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_urls: bool = False
    """Fetch http(s) URLs. Off by default: a URL in the input is refused."""
    allow_private_urls: bool = False
    """Allow URLs that resolve to loopback, private or link-local addresses (SSRF guard)."""
    max_images: int = Field(8, ge=1, le=64)
    max_bytes: int = Field(20 * 2**20, ge=1)
    """Largest encoded image accepted, in bytes."""
    max_pixels: int = Field(40_000_000, ge=1)
    """Largest decoded image accepted (width x height); guards against decompression bombs.
    At most twice Pillow's ``Image.MAX_IMAGE_PIXELS`` (Pillow decodes nothing larger)."""
    url_timeout: float = Field(10.0, gt=0, le=300)
    """Seconds a URL fetch may take in all: connecting, the headers and the body."""

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except ValidationError as err:
            raise _config_error(err) from err

    @classmethod
    def model_validate(cls, *args: Any, **kwargs: Any) -> ImagePolicy:
        try:
            return super().model_validate(*args, **kwargs)
        except ValidationError as err:
            raise _config_error(err) from err

    @classmethod
    def model_validate_json(cls, *args: Any, **kwargs: Any) -> ImagePolicy:
        try:
            return super().model_validate_json(*args, **kwargs)
        except ValidationError as err:
            raise _config_error(err) from err

    @field_validator("max_pixels")
    @classmethod
    def _decodable(cls, value: int) -> int:
        cap = _pillow_pixel_cap()
        if cap is not None and value > cap:
            raise ValueError("more pixels than Pillow decodes")
        return value


def _pillow_pixel_cap() -> int | None:
    """The most pixels Pillow decodes: it refuses images over twice ``Image.MAX_IMAGE_PIXELS``
    (``None``: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * limit


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _config_error(err: ValidationError) -> ConfigError:
    """One :class:`ConfigError` naming every bad :class:`ImagePolicy` option and what it
    takes."""
    fields = ImagePolicy.model_fields
    problems = []
    for error in err.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"])
        field = fields.get(name)
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):  # model_validate runs __init__, which raised it
            return ConfigError(str(cause))
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown option {name!r} (extra options are not allowed; the "
                            f"options are {', '.join(fields)})")
        elif field is None:
            problems.append(error["msg"])
        elif field.annotation is bool:
            problems.append(f"{name} must be true or false, not {error['input']!r}")
        else:
            bounds = [f"{symbol} {getattr(rule, attr)}" for rule in field.metadata
                      for attr, symbol in _BOUNDS if hasattr(rule, attr)]
            cap = _pillow_pixel_cap()
            if name == "max_pixels" and cap is not None:
                bounds.append(f"<= {cap} (twice Pillow's Image.MAX_IMAGE_PIXELS: Pillow "
                              "decodes nothing larger)")
            kind = "an integer" if field.annotation is int else "a number"
            problems.append(f"{name} must be {kind} {' and '.join(bounds)}, "
                            f"not {error['input']!r}")
    return ConfigError(f"ImagePolicy: {'; '.join(problems)}.")


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


_B64 = "A-Za-z0-9+/=_-"
_PAYLOAD_RE = re.compile(
    # a base64 data URL, anywhere in the text
    r"(?i:data:[\w.+/-]{0,100}(?:;[\w.+=-]{0,100}){0,8};base64,)[A-Za-z0-9+/=_%-]*"
    # a run of base64 text, maybe wrapped in lines (the look-behind keeps the scan linear)
    rf"|(?<![{_B64}])[{_B64}]{{64,}}(?:\r?\n[{_B64}]{{40,}})*")
_ENCODED_RE = re.compile(rf"[{_B64}]{{64,}}(?:\r?\n[{_B64}]+)*")
_EMBEDDED_MIN = 256
_MAX_DEPTH = 64


def redact_images(value: Any) -> Any:
    """A copy of ``value`` with image payloads replaced by short placeholders (for traces
    and logs).

    Replaced: ``bytes``, ``PIL`` images, base64 ``data:`` URLs anywhere in a string, a string
    that is base64 text (64 characters or more) and runs of base64 text of 256 characters or
    more inside other text. Base64 here means letters of both cases and digits, so words,
    paths, hex digests and separator lines stay. Mappings, lists, tuples, pydantic models
    (LangChain messages among them) and dataclasses are copied with their contents redacted;
    anything else is returned as is. Linear in the size of ``value``.
    """
    return _redact(value, 0)


def _redact(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<bytes: {len(value) if not isinstance(value, memoryview) else value.nbytes}>"
    if isinstance(value, Image.Image):
        return f"<PIL image {value.width}x{value.height}>"
    if depth > _MAX_DEPTH:
        return f"<{type(value).__name__} nested too deep>"
    depth += 1
    if isinstance(value, Mapping):
        return {key: _redact(item, depth) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item, depth) for item in value]
    if isinstance(value, tuple):
        items = [_redact(item, depth) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, BaseModel):
        names = [*type(value).model_fields, *(value.model_extra or {})]
        return value.model_copy(update={name: _redact(getattr(value, name), depth)
                                        for name in names})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        redacted = {field.name: _redact(getattr(value, field.name), depth)
                    for field in dataclasses.fields(value)}
        try:
            return dataclasses.replace(value, **{field.name: redacted[field.name]
                                                 for field in dataclasses.fields(value)
                                                 if field.init})
        except (TypeError, ValueError):  # its __init__ refuses a placeholder
            return redacted
    return value


def _redact_text(text: str) -> str:
    stripped = text.strip()
    if _ENCODED_RE.fullmatch(stripped) and _looks_encoded(stripped):
        return f"<image: {len(text)} chars>"
    return _PAYLOAD_RE.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    text = match.group()
    if text[:5].lower() == "data:" or (len(text) >= _EMBEDDED_MIN and _looks_encoded(text)):
        return f"<image: {len(text)} chars>"
    return text


def _looks_encoded(text: str) -> bool:
    """Whether base64-alphabet text mixes upper case, lower case and digits, as encoded
    binary data does (and words, hex and separator lines do not)."""
    chars = set(text)
    return bool(chars & _UPPER and chars & _LOWER and chars & _DIGITS)


_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
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
    """Open and fully decode ``data``, checking its size and pixel count before decoding.

    ``policy.max_pixels`` is the limit applied: Pillow's decompression-bomb warning (over
    ``Image.MAX_IMAGE_PIXELS``) is ignored here, as the size is checked first.
    """
    if not data:
        raise InvalidInputError("the image data is empty (0 bytes).")
    if len(data) > policy.max_bytes:
        raise InvalidInputError(f"the image is {len(data)} bytes; the limit is "
                                f"{policy.max_bytes} (ImagePolicy.max_bytes).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(BytesIO(data))
            _check_size(img.width, img.height, policy)
            img.load()
        except InvalidInputError:
            raise
        except UnidentifiedImageError as err:
            raise InvalidInputError("the data is not an image in a format Pillow can read "
                                    "(corrupt, or not an image file).") from err
        except Image.DecompressionBombError as err:
            raise InvalidInputError(f"the image is too large to decode safely ({err}); the "
                                    f"limit is {policy.max_pixels} pixels "
                                    "(ImagePolicy.max_pixels).") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise InvalidInputError(f"the image is corrupt or truncated ({err}).") from err
        except Exception as err:  # Pillow's decoders raise others on crafted files
            raise InvalidInputError(f"the image is corrupt ({type(err).__name__}: "
                                    f"{err}).") from err
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
    """The body of ``url``, fetched within ``policy.url_timeout`` seconds in all from an
    address checked by the SSRF guard (the connection goes to that very address)."""
    if not policy.allow_urls:
        raise InvalidInputError("image URLs are not allowed: download the image and pass the "
                                "file, or set ImagePolicy(allow_urls=True).")
    shown = repr(url[:200])
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as err:
        raise InvalidInputError(f"URL {shown} has an invalid port.") from err
    host = parts.hostname
    if not host:
        raise InvalidInputError(f"URL {shown} has no host.")
    tls = parts.scheme.lower() == "https"
    port = port or (443 if tls else 80)
    deadline = time.monotonic() + policy.url_timeout
    addresses = _resolve(host, port, check=not policy.allow_private_urls)
    connection = _PinnedConnection(host, port, addresses, tls=tls, deadline=deadline)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        connection.request("GET", target, headers={"Accept": "image/*"})
        with connection.getresponse() as response:
            if 300 <= response.status < 400:
                raise InvalidInputError("the image URL redirects; pass the final URL instead.")
            if response.status != 200:
                raise InvalidInputError(f"cannot fetch {shown}: the server answered HTTP "
                                        f"{response.status} {response.reason}.")
            data = _read_body(response, policy.max_bytes, shown)
    except InvalidInputError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        if connection.timed_out or time.monotonic() >= deadline:
            raise _too_slow(shown, policy) from err
        raise InvalidInputError(f"cannot fetch {shown}: {err}.") from err
    finally:
        connection.finish()
    if connection.timed_out:  # the body was cut short
        raise _too_slow(shown, policy)
    return data


def _read_body(response: http.client.HTTPResponse, limit: int, shown: str) -> bytes:
    chunks, size = [], 0
    while chunk := response.read1(65536):
        size += len(chunk)
        if size > limit:
            raise InvalidInputError(f"the image at {shown} is larger than {limit} bytes "
                                    "(ImagePolicy.max_bytes).")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_slow(shown: str, policy: ImagePolicy) -> InvalidInputError:
    return InvalidInputError(f"fetching {shown} timed out: it took longer than "
                             f"{policy.url_timeout:g} s (ImagePolicy.url_timeout).")


_Address: TypeAlias = tuple[Any, ...]  # one getaddrinfo result


def _resolve(host: str, port: int, *, check: bool) -> list[_Address]:
    """The addresses of ``host``, every one of them public unless ``check`` is false."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise InvalidInputError(f"cannot resolve host {host!r}: {err}.") from err
    if not addresses:
        raise InvalidInputError(f"cannot resolve host {host!r}: no addresses.")
    for *_, sockaddr in addresses:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if check and (not ip.is_global or ip.is_multicast):
            raise InvalidInputError(f"host {host!r} resolves to the non-public address {ip}; "
                                    "set ImagePolicy(allow_private_urls=True) to allow it.")
    return addresses


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP or HTTPS connection to addresses resolved (and checked) beforehand.

    It connects to those addresses, never resolving the host again, so a DNS answer that
    changes after the check (DNS rebinding) is never used; the Host header, the TLS server
    name and the certificate check use the URL's host. At ``deadline`` (a
    ``time.monotonic()`` value) the connection is shut down wherever the fetch is blocked,
    and :attr:`timed_out` turns true.
    """

    def __init__(self, host: str, port: int, addresses: list[_Address], *, tls: bool,
                 deadline: float) -> None:
        super().__init__(host, port)
        self.default_port = 443 if tls else 80  # the Host header leaves the default port out
        self._hostname, self._addresses, self._tls = host, addresses, tls
        self._deadline = deadline
        self._expired = threading.Event()
        self._watchdog: tuple[threading.Timer, socket.socket] | None = None

    @property
    def timed_out(self) -> bool:
        return self._expired.is_set()

    def connect(self) -> None:
        sock = self._open_socket()
        watched = sock.dup()  # the same connection, usable from the watchdog's thread
        timer = threading.Timer(max(self._deadline - time.monotonic(), 0.0), self._expire,
                                (watched,))
        timer.daemon = True
        self._watchdog = (timer, watched)
        timer.start()
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock,
                                                            server_hostname=self._hostname)
        self.sock = sock

    def finish(self) -> None:
        """Close the connection and stop the deadline's watch (``close`` keeps it: the
        response may still be reading)."""
        self.close()
        if self._watchdog is not None:
            timer, watched = self._watchdog
            self._watchdog = None
            timer.cancel()
            timer.join()
            watched.close()

    def _open_socket(self) -> socket.socket:
        failure: OSError = TimeoutError("timed out")
        for family, kind, proto, _, sockaddr in self._addresses:
            left = self._deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                sock.close()
                failure = err
        raise failure

    def _expire(self, watched: socket.socket) -> None:
        self._expired.set()
        with contextlib.suppress(OSError):  # already closed by the server
            watched.shutdown(socket.SHUT_RDWR)
