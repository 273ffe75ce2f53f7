"""Pictures for people: boxes and phrase labels drawn on images (predict, demo report).

Boxes are COCO ``[x, y, w, h]`` in pixels of the image they are drawn on.
"""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40))


def draw_boxes(image: Image.Image, boxes: Sequence[dict[str, Any]], scale: int = 1) -> Image.Image:
    """A copy of ``image`` (upscaled ``scale`` times, so labels stay legible on tiny images)
    with each ``{"bbox": [x, y, w, h], "label": str, "score": float | None, "colour": int}`` drawn:
    a rectangle, and the label (with the score when given) on a filled strip above it."""
    img = image.convert("RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for i, b in enumerate(boxes):
        colour = PALETTE[int(b.get("colour", i)) % len(PALETTE)]
        x, y, w, h = (float(v) * scale for v in b["bbox"])
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=max(2, scale))
        label = str(b.get("label", ""))
        if b.get("score") is not None:
            label = f"{label} {float(b['score']):.2f}"
        if label:
            left, top, right, bottom = draw.textbbox((0, 0), label)
            ty = max(0.0, y - (bottom - top) - 3)
            draw.rectangle([x, ty, x + (right - left) + 4, ty + (bottom - top) + 3], fill=colour)
            draw.text((x + 2, ty), label, fill=(255, 255, 255))
    return img


def grid(images: Sequence[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    """Images tiled left to right, top to bottom, on white."""
    if not images:
        return Image.new("RGB", (1, 1), "white")
    cw = max(im.width for im in images) + pad
    ch = max(im.height for im in images) + pad
    rows = (len(images) + columns - 1) // columns
    out = Image.new("RGB", (cw * min(columns, len(images)), ch * rows), "white")
    for k, im in enumerate(images):
        out.paste(im, ((k % columns) * cw, (k // columns) * ch))
    return out
