"""Bad-input catalogue cases for images: URL fetches (DNS rebinding, slow servers, odd
URLs), Pillow's pixel limit and ``ImagePolicy`` options. Also the loopback image server and
the DNS stand-in that tests/test_images.py uses."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from bad_inputs import Case, png, png_header
from PIL import Image

from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.images import ImagePolicy, load_images

PUBLIC_IP = "93.184.215.14"  # example.com's: a public address nothing in the tests serves
DRIP_S = 0.3


class ImageServer(http.server.ThreadingHTTPServer):
    """A loopback server answering ``body`` as a PNG at any path, ``/redirect`` with a
    redirect and ``/missing`` with 404; it records each request's path and Host header.
    With ``drip`` ("headers" or "body") it sends that part one byte every 0.3 s. With
    ``tls`` (a server-side context) it speaks HTTPS and records the TLS server names."""

    daemon_threads = True

    def __init__(self, body: bytes, drip: str = "", tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _ImageHandler)
        self.body, self.drip = body, drip
        self.requests: list[tuple[str, str]] = []
        self.server_names: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda sock, name, context: self.server_names.append(name)
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> ImageServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        body = self.server.body
        status = {"/redirect": "302 Found", "/missing": "404 Not Found"}.get(self.path, "200 OK")
        head = (f"HTTP/1.0 {status}\r\nLocation: /img.png\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        slow = {"headers": head, "body": body}.get(self.server.drip)
        try:
            for part in (head, body):
                if part is slow:  # a byte at a time, until the client gives up
                    for byte in part[:40]:
                        self.wfile.write(bytes([byte]))
                        time.sleep(DRIP_S)
                    return
                self.wfile.write(part)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args: Any) -> None:
        pass


class Resolver:
    """A stand-in for ``socket.getaddrinfo``: ``first`` for the first lookup, ``later`` for
    every other one (a DNS answer that changes: rebinding)."""

    def __init__(self, first: str, later: str) -> None:
        self.first, self.later = first, later
        self.lookups = 0

    def __call__(self, host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        address = self.first if self.lookups == 0 else self.later
        self.lookups += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]


@contextmanager
def resolving(first: str, later: str) -> Iterator[Resolver]:
    resolver = Resolver(first, later)
    with mock.patch.object(socket, "getaddrinfo", resolver):
        yield resolver


def _rebound() -> None:
    """A host checked as public whose next DNS answer is a loopback server: the fetch must
    not reach that server."""
    with ImageServer(png()) as server, resolving(PUBLIC_IP, "127.0.0.1"):
        try:
            load_images(f"http://images.example:{server.port}/img.png",
                        ImagePolicy(allow_urls=True, url_timeout=1))
        finally:
            assert not server.requests, "the fetch went to the rebound loopback address"


def _served(path: str, drip: str = "") -> None:
    with ImageServer(png(), drip=drip) as server:
        load_images(f"http://127.0.0.1:{server.port}{path}",
                    ImagePolicy(allow_urls=True, allow_private_urls=True, url_timeout=1))


URLS = ImagePolicy(allow_urls=True)
CAP = 2 * (Image.MAX_IMAGE_PIXELS or 0)

CASES: list[Case] = [
    Case("ImagePolicy", "max_images=65", ConfigError,
         "max_images must be an integer >= 1 and <= 64", lambda c: ImagePolicy(max_images=65)),
    Case("ImagePolicy", "max_pixels above what Pillow decodes", ConfigError,
         "Image.MAX_IMAGE_PIXELS", lambda c: ImagePolicy(max_pixels=CAP + 1)),
    Case("ImagePolicy", "url_timeout=0", ConfigError, "url_timeout must be a number > 0",
         lambda c: ImagePolicy(url_timeout=0)),
    Case("ImagePolicy", "allow_urls='maybe'", ConfigError, "allow_urls must be true or false",
         lambda c: ImagePolicy(allow_urls="maybe")),
    Case("ImagePolicy.model_validate_json", "an unknown key", ConfigError,
         "unknown option 'allow_url'",
         lambda c: ImagePolicy.model_validate_json('{"allow_url": true}')),
    Case("graph.invoke image", "a PNG declaring more pixels than Pillow decodes "
         "(max_pixels at its cap)", InvalidInputError, "ImagePolicy.max_pixels",
         lambda c: c.ask(png_header(20_000, 10_000), image_policy=ImagePolicy(max_pixels=CAP))),
    Case("load_images (URLs allowed)", "a host whose DNS answer turns to loopback after the "
         "check (rebinding)", InvalidInputError, "fetch", lambda c: _rebound()),
    Case("load_images (URLs allowed)", "a server sending the body a byte at a time",
         InvalidInputError, "timed out", lambda c: _served("/img.png", drip="body")),
    Case("load_images (URLs allowed)", "a server sending the headers a byte at a time",
         InvalidInputError, "timed out", lambda c: _served("/img.png", drip="headers")),
    Case("load_images (URLs allowed)", "a URL answering 404", InvalidInputError, "HTTP 404",
         lambda c: _served("/missing")),
    Case("load_images (URLs allowed)", "a URL that redirects", InvalidInputError, "redirects",
         lambda c: _served("/redirect")),
    Case("load_images (URLs allowed)", "a URL with an invalid port", InvalidInputError,
         "invalid port", lambda c: load_images("http://example.com:99999/a.png", URLS)),
    Case("load_images (URLs allowed)", "an IPv4-mapped IPv6 loopback address",
         InvalidInputError, "non-public address 127.0.0.1",
         lambda c: load_images("http://[::ffff:127.0.0.1]:9/a.png", URLS)),
]
