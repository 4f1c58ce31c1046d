"""Pictures for the tests, made here: good ones in every accepted format, and the bad ones users send."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mtm_bot.core.errors import ImageError, NotAnImage, TooManyPixels, TruncatedImage


def picture_bytes(fmt: str = "PNG", size: tuple[int, int] = (160, 120), seed: int = 0) -> bytes:
    """A noisy colour picture (noise keeps a JPEG large enough to cut in half meaningfully)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height pixels in a few kilobytes: huge once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def bad_pictures(folder: str | Path) -> dict[str, tuple[Path, type[ImageError], str]]:
    """name -> (file, the error it must raise, a fragment of the user's message)."""
    folder = Path(folder)
    jpeg = picture_bytes("JPEG", (320, 240))
    files = {
        "not_an_image": (b"this is a text file, not a picture\n" * 20, "notes.png", NotAnImage, "not a picture"),
        "decompression_bomb": (png_bomb(), "bomb.png", TooManyPixels, "10000 × 10000 pixels"),
        "truncated": (jpeg[: len(jpeg) // 2], "cut.jpg", TruncatedImage, "truncated"),
    }
    out = {}
    for name, (data, filename, error, fragment) in files.items():
        path = folder / filename
        path.write_bytes(data)
        out[name] = (path, error, fragment)
    return out
