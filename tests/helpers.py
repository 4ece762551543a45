"""Helpers that build test images and script model replies."""

from __future__ import annotations

import json
from io import BytesIO

from PIL import Image


def png_bytes(size: tuple[int, int] = (16, 12), color: str = "red", mode: str = "RGB") -> bytes:
    buffer = BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def step(summary: str, reasoning: str = "details", action: str = "continue") -> str:
    return json.dumps({"summary": summary, "reasoning": reasoning, "action": action})


def verdict(answer: str, correct: bool = True, critique: str = "") -> str:
    return json.dumps({"reasoning_correct": correct, "critique": critique, "answer": answer})


def png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size (no pixel data): for zero-size and bomb inputs."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")
