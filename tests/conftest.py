"""Shared fixtures: small images and helpers that script model replies."""

from __future__ import annotations

import base64
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
