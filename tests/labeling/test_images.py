"""labeling.images: every kind of hostile web image becomes an RGB image or a counted reason."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from labeling.images import (SKIP_BOMB, SKIP_CORRUPT, SKIP_EMPTY, SKIP_TOO_SMALL, SKIP_TRUNCATED,
                             DecodedImage, ImageSkip, decode_image, extension_for)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 64, h: int = 48) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb header)."""
    data = bytearray(encode(Image.new("L", (16, 16)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_plain_jpeg_decodes_to_rgb_of_stored_size():
    out = decode_image(encode(gradient(64, 48), "JPEG"))
    assert isinstance(out, DecodedImage)
    assert out.image.mode == "RGB" and out.image.size == (64, 48)
    assert (out.width, out.height, out.format, out.extension) == (64, 48, "JPEG", "jpg")


def test_png_alpha_is_composited_over_white():
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 16, 32))          # left half fully transparent blue
    out = decode_image(encode(img, "PNG"))
    assert isinstance(out, DecodedImage) and out.image.mode == "RGB" and out.extension == "png"
    assert out.image.getpixel((4, 4)) == (255, 255, 255)
    assert out.image.getpixel((28, 4)) == (255, 0, 0)


def test_palette_with_transparency_and_gray_alpha():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    out = decode_image(encode(pal, "PNG", transparency=0))
    assert isinstance(out, DecodedImage) and out.image.getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (20, 20), (10, 255))
    out = decode_image(encode(la, "PNG"))
    assert isinstance(out, DecodedImage) and out.image.getpixel((0, 0)) == (10, 10, 10)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("1", "PNG"), ("CMYK", "JPEG"), ("P", "GIF")])
def test_grayscale_cmyk_palette_become_rgb(mode, fmt):
    img = gradient(40, 40).convert(mode)
    out = decode_image(encode(img, fmt))
    assert isinstance(out, DecodedImage)
    assert out.image.mode == "RGB" and out.image.size == (40, 40)


def test_cmyk_colours_survive_conversion():
    cmyk = Image.new("CMYK", (24, 24), (0, 255, 255, 0))    # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    r, g, b = out.image.getpixel((12, 12))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_rescaled_not_clipped():
    arr = np.full((20, 20), 32768, dtype=np.uint16)     # mid gray in 16 bits
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert isinstance(out, DecodedImage)
    assert 120 <= out.image.getpixel((5, 5))[0] <= 135


def test_truncated_jpeg_is_a_skip():
    data = encode(gradient(128, 128), "JPEG", quality=90)
    out = decode_image(data[: len(data) // 2])
    assert isinstance(out, ImageSkip) and out.reason == SKIP_TRUNCATED


@pytest.mark.parametrize("data", [b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 64,
                                  b"\x89PNG\r\n\x1a\n" + b"garbage" * 10])
def test_corrupt_bytes_are_a_skip(data):
    out = decode_image(data)
    assert isinstance(out, ImageSkip) and out.reason == SKIP_CORRUPT


def test_empty_bytes():
    assert decode_image(b"") == ImageSkip(SKIP_EMPTY)


@pytest.mark.parametrize("size", [(1, 1), (200, 4)])
def test_tiny_images_are_a_skip(size):
    out = decode_image(encode(Image.new("RGB", size), "PNG"))
    assert isinstance(out, ImageSkip) and out.reason == SKIP_TOO_SMALL


def test_decompression_bomb_is_refused_from_the_header():
    out = decode_image(png_with_header_size(30_000, 30_000))     # 900 Mpx claimed, bytes are tiny
    assert isinstance(out, ImageSkip) and out.reason == SKIP_BOMB
    out = decode_image(encode(gradient(64, 64), "PNG"), max_pixels=64 * 63)
    assert isinstance(out, ImageSkip) and out.reason == SKIP_BOMB


def test_extension_for_formats():
    assert extension_for("JPEG") == "jpg" and extension_for("PNG") == "png"
    assert extension_for(None) == "jpg"
