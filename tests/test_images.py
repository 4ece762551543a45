"""Image input: every accepted form, and every bad input refused with a typed error."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import ssl
import time
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from bad_inputs_images import PUBLIC_IP, ImageServer, resolving
from helpers import png_bytes, png_header
from PIL import Image
from pydantic import BaseModel

from insightv_agents.errors import ConfigError, InvalidInputError
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


# --- URL fetches: the checked address, an overall deadline ---

def test_dns_rebinding_cannot_redirect_the_fetch_to_loopback(png: bytes) -> None:
    """The host resolves to a public address for the check, then to a loopback server: the
    connection goes to the checked address, so the loopback server never sees a request."""
    with (ImageServer(png) as server, resolving(PUBLIC_IP, "127.0.0.1") as resolver,
          pytest.raises(InvalidInputError, match="fetch")):
        load_images(f"http://images.example:{server.port}/img.png",
                    ImagePolicy(allow_urls=True, url_timeout=1))
    assert server.requests == [] and resolver.lookups == 1


def test_fetch_connects_to_the_resolved_address_and_keeps_the_host_header(png: bytes) -> None:
    with ImageServer(png) as server, resolving("127.0.0.1", PUBLIC_IP) as resolver:
        policy = ImagePolicy(allow_urls=True, allow_private_urls=True, url_timeout=5)
        url = load_images(f"http://images.example:{server.port}/img.png?size=2", policy)[0]
    assert data_url_bytes(url) == png and resolver.lookups == 1
    assert server.requests == [("/img.png?size=2", f"images.example:{server.port}")]


def _certificate(tmp_path: Path, host: str) -> tuple[ssl.SSLContext, Path]:
    """A server context whose certificate for ``host`` a new CA signed, and that CA's file."""
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem")
    return context, tmp_path / "ca.pem"


@pytest.mark.parametrize(("certified", "fetched"), [("images.example", True),
                                                    ("other.example", False)])
def test_https_fetch_sends_the_host_name_and_verifies_the_certificate_for_it(
        png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, certified: str,
        fetched: bool) -> None:
    context, ca = _certificate(tmp_path, certified)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the CA the client trusts
    policy = ImagePolicy(allow_urls=True, allow_private_urls=True, url_timeout=5)
    with ImageServer(png, tls=context) as server, resolving("127.0.0.1", PUBLIC_IP):
        url = f"https://images.example:{server.port}/img.png"
        if fetched:
            assert data_url_bytes(load_images(url, policy)[0]) == png
            assert server.requests == [("/img.png", f"images.example:{server.port}")]
        else:
            with pytest.raises(InvalidInputError, match="certificate"):
                load_images(url, policy)
            assert server.requests == []
    assert server.server_names == ["images.example"]


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_url_timeout_bounds_the_whole_fetch(png: bytes, drip: str) -> None:
    """A server sending a byte every 0.3 s never trips a per-read timeout of 1 s; the fetch
    still ends, with a typed error, about 1 s after it began."""
    with ImageServer(png, drip=drip) as server:
        start = time.monotonic()
        with pytest.raises(InvalidInputError, match=r"timed out.*ImagePolicy\.url_timeout"):
            load_images(f"http://127.0.0.1:{server.port}/img.png",
                        ImagePolicy(allow_urls=True, allow_private_urls=True, url_timeout=1))
        assert 0.9 < time.monotonic() - start < 2


# --- Pillow's pixel limit: ImagePolicy.max_pixels is the one applied ---

PILLOW_CAP = 2 * (Image.MAX_IMAGE_PIXELS or 0)
OVER_PILLOW_WARNING = png_header(10_000, 10_000)  # 1e8 pixels: over MAX_IMAGE_PIXELS, under 2x
OVER_PILLOW_CAP = png_header(20_000, 10_000)  # 2e8 pixels: Pillow refuses it whatever we say


def test_max_pixels_above_pillows_warning_limit_is_honoured() -> None:
    """The header-only PNG passes both pixel checks and fails only when its (missing) pixel
    data is decoded, even where warnings are errors; Pillow's global is left alone."""
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < 10**8
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInputError, match="corrupt or truncated"):
            load_images(OVER_PILLOW_WARNING, ImagePolicy(max_pixels=PILLOW_CAP))
    with pytest.raises(InvalidInputError, match=r"100000000 pixels; the limit is 99999999"):
        load_images(OVER_PILLOW_WARNING, ImagePolicy(max_pixels=10**8 - 1))
    assert before == Image.MAX_IMAGE_PIXELS


def test_max_pixels_cannot_exceed_what_pillow_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImagePolicy(max_pixels=PILLOW_CAP).max_pixels == PILLOW_CAP
    with pytest.raises(ConfigError, match=rf"max_pixels must be .*<= {PILLOW_CAP}"):
        ImagePolicy(max_pixels=PILLOW_CAP + 1)
    with pytest.raises(InvalidInputError, match=r"too large to decode safely.*max_pixels"):
        load_images(OVER_PILLOW_CAP, ImagePolicy(max_pixels=PILLOW_CAP))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow unlimited: so is the policy
    assert ImagePolicy(max_pixels=10**12).max_pixels == 10**12


# --- ImagePolicy options: our ConfigError, naming the option and what it takes ---

@pytest.mark.parametrize(("options", "message"), [
    ({"max_images": 0}, "max_images must be an integer >= 1 and <= 64, not 0"),
    ({"max_images": "many"}, "max_images must be an integer >= 1 and <= 64, not 'many'"),
    ({"max_bytes": 0}, "max_bytes must be an integer >= 1, not 0"),
    ({"max_pixels": -5}, "max_pixels must be an integer >= 1 and <= "),
    ({"url_timeout": 0}, "url_timeout must be a number > 0 and <= 300, not 0"),
    ({"url_timeout": 301}, "url_timeout must be a number > 0 and <= 300, not 301"),
    ({"allow_urls": "maybe"}, "allow_urls must be true or false, not 'maybe'"),
    ({"allow_url": True}, "unknown option 'allow_url' (extra options are not allowed; "
                          "the options are allow_urls, allow_private_urls"),
])
def test_bad_policy_options_raise_config_error(options: dict[str, Any], message: str) -> None:
    for build in (lambda: ImagePolicy(**options), lambda: ImagePolicy.model_validate(options),
                  lambda: ImagePolicy.model_validate_json(json.dumps(options))):
        with pytest.raises(ConfigError) as info:
            build()
        assert str(info.value) == f"ImagePolicy: {message}" or message in str(info.value)
        assert str(info.value).startswith("ImagePolicy: ") and "Value error" not in str(info.value)
        assert isinstance(info.value, ValueError)


def test_every_bad_option_is_named_once() -> None:
    with pytest.raises(ConfigError) as info:
        ImagePolicy(max_images=0, url_timeout=-1)
    assert str(info.value).count("max_images") == 1 and "url_timeout" in str(info.value)
    with pytest.raises(ConfigError, match="valid dictionary"):
        ImagePolicy.model_validate(5)
    assert ImagePolicy.model_validate({"max_images": 3}).max_images == 3


# --- redaction: no image payload in any form survives; ordinary text does ---

def _noise_png(side: int = 48) -> bytes:
    return encoded(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)), "PNG")


ORDINARY = [
    "What is the total of the red bars in Figure 2?",
    "Step 1: the chart has 4 bars.\nStep 2: 3 + 4 + 5 + 6 = 18.\n<answer>18</answer>",
    "/data/ChartQA/images/train_000123_Fig2.png",
    "C:\\Users\\Ann\\Pictures\\holiday-2024.jpeg",
    "sha256 " + "3f2a9c0b" * 8,  # a hex digest
    "=" * 400,  # a separator line
    "x" * 300,
    "https://example.com/images/cat.png?size=large&v=2",
    "short_base64_like_Token123",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_redaction_keeps_ordinary_text(text: str) -> None:
    assert redact_images(text) == text
    assert redact_images({"question": text, "steps": [text, (text,)]}) == {
        "question": text, "steps": [text, (text,)]}


def test_redaction_removes_every_form_of_image_payload() -> None:
    from langchain_core.messages import AIMessage, HumanMessage

    data = _noise_png()
    b64 = base64.b64encode(data).decode()
    url = f"data:image/png;base64,{b64}"
    question = "How many squares are there?"
    value = {
        "image": b64,
        "wrapped": base64.encodebytes(data).decode(),
        "urlsafe": base64.urlsafe_b64encode(data).decode(),
        "upper data URL": "DATA:image/PNG;BASE64," + b64,
        "in text": f"{question} {b64} -- see above",
        "data URL in text": f'<img src="{url}"> {question}',
        "raw": data,
        "array": bytearray(data),
        "view": memoryview(data),
        "pil": Image.new("RGB", (3, 2)),
        "messages": (HumanMessage(content=[
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "image", "source_type": "base64", "mime_type": "image/png", "data": b64},
        ]), AIMessage(content="The image shows 3 squares.")),
    }
    redacted = redact_images(value)
    flat = repr(redacted)
    for start in range(0, len(b64) - 40, 40):  # no 40 characters of the payload anywhere
        assert b64[start:start + 40] not in flat
    assert base64.urlsafe_b64encode(data).decode()[:40] not in flat
    assert redacted["in text"] == f"{question} <image: {len(b64)} chars> -- see above"
    assert redacted["data URL in text"] == f'<img src="<image: {len(url)} chars>"> {question}'
    assert redacted["raw"] == redacted["array"] == redacted["view"] == f"<bytes: {len(data)}>"
    assert redacted["pil"] == "<PIL image 3x2>"
    human, ai = redacted["messages"]
    assert isinstance(redacted["messages"], tuple) and isinstance(human, HumanMessage)
    assert human.content[0] == {"type": "text", "text": question}
    assert human.content[1]["image_url"]["url"] == f"<image: {len(url)} chars>"
    assert ai.content == "The image shows 3 squares."
    assert value["image"] == b64 and isinstance(value["messages"][0].content[1], dict)  # a copy


def test_redaction_reaches_into_models_and_dataclasses() -> None:
    b64 = base64.b64encode(_noise_png()).decode()

    class Sample(BaseModel):
        image: str
        question: str

    @dataclasses.dataclass(frozen=True)
    class Row:
        image: str
        question: str

    redacted = redact_images([Sample(image=b64, question="q?"), Row(image=b64, question="q?")])
    placeholder = f"<image: {len(b64)} chars>"
    assert redacted == [Sample(image=placeholder, question="q?"),
                        Row(image=placeholder, question="q?")]


def test_redaction_is_linear_on_a_megabyte() -> None:
    b64 = base64.b64encode(os.urandom(750_000)).decode()
    words = "What is shown in Figure 2 of the paper? /data/IMG_0001.png 3f2a9c0b\n"
    text = words * (1_000_000 // len(words))
    near_misses = ("A1b" * 85 + " ") * (1_000_000 // 256)  # base64 runs just under 256
    for value, kept in ((b64, False), (text, True), (near_misses, True),
                        (text[:500_000] + b64[:500_000], False),
                        ("data:image/png;base64," + b64, False), ("ab\n" * 333_333, True)):
        start = time.perf_counter()
        redacted = redact_images(value)
        assert time.perf_counter() - start < 0.2
        assert redacted == value if kept else len(redacted) < 500_100
