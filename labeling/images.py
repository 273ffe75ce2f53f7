"""Safe image decoding for pseudo-labeling: web bytes in, an RGB PIL image or a skip reason out.

Crawled images are hostile input: corrupt or truncated files, PNGs with alpha,
grayscale, CMYK, palette and 16-bit images, 1x1 tracking pixels, decompression
bombs. ``decode_image`` turns each into either a fully decoded RGB image or an
``ImageSkip`` with a stable reason string the caller counts (``StageCounts.skip``);
it never raises on bad bytes.

Pixels are the pixels *as stored*: EXIF orientation is deliberately not applied,
because every reader of our shards (webdataset, PIL, the student's loader) decodes
the stored bytes without it, and pseudo-label boxes must live in those coordinates.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL's own default limit (Image.MAX_IMAGE_PIXELS, ~0.25 GB as 24-bit RGB). We check it
# ourselves from the header instead of mutating PIL's global, so the limit is explicit.
MAX_PIXELS = 89_478_485
# Smaller images hold no object a detector can box (and are usually tracking pixels).
MIN_SIDE = 16

SKIP_EMPTY = "empty_image"
SKIP_CORRUPT = "corrupt_image"
SKIP_TRUNCATED = "truncated_image"
SKIP_BOMB = "decompression_bomb"
SKIP_TOO_SMALL = "image_too_small"

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
               "BMP": "bmp", "TIFF": "tiff"}


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded image, mode RGB, ``width`` x ``height`` pixels as stored."""
    image: Image.Image
    width: int
    height: int
    format: str           # PIL format name of the stored bytes: "JPEG", "PNG", ...

    @property
    def extension(self) -> str:
        """File extension matching the stored bytes ("jpg", "png", ...)."""
        return extension_for(self.format)


@dataclass(frozen=True)
class ImageSkip:
    """Why an image cannot be used: ``reason`` is one of the SKIP_* strings."""
    reason: str
    detail: str = ""


def extension_for(pil_format: str | None) -> str:
    """The file extension for a PIL format name; "jpg" when unknown (the webdataset default)."""
    return _EXTENSIONS.get((pil_format or "").upper(), "jpg")


def decode_image(data: bytes, *, min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS) -> DecodedImage | ImageSkip:
    """Decode ``data`` completely into RGB, or say why not.

    The size is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. Alpha is composited over white (transparent
    regions of logos and cut-outs are white on the web pages they come from);
    grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB.
    """
    if not data:
        return ImageSkip(SKIP_EMPTY)
    with warnings.catch_warnings():
        # PIL warns (and past 2x, raises) on huge images; make both one outcome.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return ImageSkip(SKIP_BOMB, str(exc))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            return ImageSkip(SKIP_CORRUPT, str(exc))
        width, height = img.size
        if width * height > max_pixels:
            return ImageSkip(SKIP_BOMB, f"{width}x{height} exceeds {max_pixels} pixels")
        if min(width, height) < min_side:
            return ImageSkip(SKIP_TOO_SMALL, f"{width}x{height} (smallest side must be >= {min_side})")
        fmt = img.format or ""
        try:
            img.load()
            rgb = _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return ImageSkip(SKIP_BOMB, str(exc))
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            reason = SKIP_TRUNCATED if "truncated" in str(exc).lower() else SKIP_CORRUPT
            return ImageSkip(reason, str(exc))
    return DecodedImage(rgb, rgb.width, rgb.height, fmt)


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; alpha composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # convert("RGB") would clip 16-bit values to 255 (an all-white image): rescale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        gray = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")   # L, 1, P, CMYK, YCbCr, LAB, HSV
