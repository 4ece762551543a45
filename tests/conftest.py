"""Shared fixtures: small images and helpers that script model replies."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes


@pytest.fixture
def png() -> bytes:
    return png_bytes()


@pytest.fixture
def png_b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


@pytest.fixture
def image_path(tmp_path: Path, png: bytes) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(png)
    return path


@pytest.fixture
def inputs(image_path: Path) -> dict[str, Any]:
    return {"image": str(image_path), "question": "How many red squares?"}


@pytest.fixture(autouse=True)
def no_remote_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests may use loopback only; anything else is a bug in the test or the library."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network disabled in tests (tried {host})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
