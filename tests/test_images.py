"""Image input: every accepted form, and every bad input refused with a typed error."""

from __future__ import annotations

import base64
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes, png_header
from PIL import Image

from insightv_agents.errors import InvalidInputError
from insightv_agents.images import (
    ImagePolicy,
    data_url_bytes,
    load_images,
    open_image,
    redact_images,
)


def encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_accepted_forms_all_give_the_same_data_url(tmp_path: Path) -> None:
    data = png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    forms: list[Any] = [str(path), path, data, bytearray(data), b64, f"data:image/png;base64,{b64}",
                        "  " + b64 + "\n"]
    urls = [load_images(form)[0] for form in forms]
    assert len(set(urls)) == 1
    assert data_url_bytes(urls[0]) == data  # RGB PNG is kept byte for byte


def test_pil_image_and_list() -> None:
    urls = load_images([Image.new("RGB", (5, 4), "blue"), png_bytes((3, 3))])
    assert len(urls) == 2 and all(url.startswith("data:image/png;base64,") for url in urls)
    assert open_image(urls[0]).size == (5, 4)


@pytest.mark.parametrize(("image", "mode"), [
    (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "RGBA"),
    (Image.new("CMYK", (4, 4)), "CMYK"),
    (Image.new("I;16", (4, 4), 65535), "I;16"),
    (Image.new("P", (4, 4)), "P"),
    (Image.new("LA", (4, 4)), "LA"),
    (Image.new("1", (4, 4)), "1"),
])
def test_unusual_modes_become_rgb(image: Image.Image, mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = open_image(load_images(encoded(image, fmt))[0])
    assert decoded.mode == "RGB" and decoded.size == (4, 4)


def test_transparent_pixels_become_white() -> None:
    url = load_images(encoded(Image.new("RGBA", (2, 2), (255, 0, 0, 0)), "PNG"))[0]
    assert open_image(url).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped() -> None:
    url = load_images(encoded(Image.new("I;16", (2, 2), 32768), "PNG"))[0]
    assert open_image(url).getpixel((0, 0)) == (128, 128, 128)


def test_animated_gif_takes_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), color) for color in ("red", "blue")]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = open_image(load_images(data)[0])
    assert decoded.getpixel((0, 0))[0] > 200


BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("none", None, "`image` is required"),
    ("empty list", [], "empty list"),
    ("int", 42, "unsupported type int"),
    ("dict", {"path": "x"}, "unsupported type dict"),
    ("empty string", "   ", "empty string"),
    ("missing path", "/no/such/image.png", "no such file"),
    ("long broken image text, not echoed", "iVBOR" + "!" * 300, "305 characters of text"),
    ("empty bytes", b"", "empty"),
    ("not an image", b"hello world, not an image", "not an image"),
    ("corrupt png", png_bytes()[:20] + b"\x00" * 50, "corrupt"),
    ("truncated png", png_bytes((64, 64))[:-30], "truncated"),
    ("zero-size png", png_header(0, 10), "not an image in a format Pillow can read"),
    ("zero-size pil", Image.new("RGB", (0, 0)), "zero size"),
    ("huge png", png_header(8_000, 8_000), "64000000 pixels; the limit is 40000000"),
    ("decompression bomb", png_header(100_000, 100_000), "too large to decode safely"),
    ("http url", "http://example.com/a.png", "URLs are not allowed"),
    ("https url", "https://example.com/a.png", "URLs are not allowed"),
    ("file url", "file:///etc/passwd", "scheme 'file' is not supported"),
    ("ftp url", "ftp://example.com/a.png", "scheme 'ftp'"),
    ("bad base64", "data:image/png;base64,@@@@", "invalid base64"),
    ("data url not base64", "data:image/png,abc", "not a base64 data URL"),
    ("base64 of junk", base64.b64encode(b"x" * 100).decode(), "not an image"),
    ("too many", [png_bytes()] * 9, "at most 8"),
    ("bad item in list", [png_bytes(), 3.5], r"image\[1\]: unsupported type float"),
]


@pytest.mark.parametrize(("image", "message"), [(i, m) for _, i, m in BAD_INPUTS],
                         ids=[name for name, _, _ in BAD_INPUTS])
def test_bad_images_are_refused(image: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        load_images(image)
    assert info.value.field == "image"


def test_directory_and_oversized_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a regular file"):
        load_images(str(tmp_path))
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes((64, 64)))
    with pytest.raises(InvalidInputError, match=r"ImagePolicy\.max_bytes"):
        load_images(big, ImagePolicy(max_bytes=100))
    with pytest.raises(InvalidInputError, match=r"ImagePolicy\.max_pixels"):
        load_images(big, ImagePolicy(max_pixels=100))


def test_private_urls_refused_even_when_urls_allowed() -> None:
    policy = ImagePolicy(allow_urls=True)
    for url in ("http://127.0.0.1/a.png", "http://localhost:9/a.png", "http://10.0.0.1/x.png",
                "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(InvalidInputError, match="non-public address"):
            load_images(url, policy)


def test_allowed_url_is_fetched_from_a_loopback_server(png: bytes) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        policy = ImagePolicy(allow_urls=True, allow_private_urls=True)
        assert data_url_bytes(load_images(f"{base}/img.png", policy)[0]) == png
        with pytest.raises(InvalidInputError, match="redirects"):
            load_images(f"{base}/redirect", policy)
        with pytest.raises(InvalidInputError, match="larger than"):
            load_images(f"{base}/img.png", ImagePolicy(allow_urls=True, allow_private_urls=True,
                                                       max_bytes=10))
    finally:
        server.shutdown()


def test_policy_rejects_unknown_and_absurd_options() -> None:
    with pytest.raises(ValueError):
        ImagePolicy(allow_url=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        ImagePolicy(max_images=0)


def test_redaction_keeps_structure_drops_payloads() -> None:
    url = load_images(png_bytes())[0]
    redacted = redact_images({"images": [url], "question": "q", "raw": b"abc", "n": 1})
    assert redacted == {"images": [f"<image: {len(url)} chars>"], "question": "q",
                        "raw": "<bytes: 3>", "n": 1}
