"""``glipctl inspect --render``: draw boxes and their phrases onto PNGs.

Boxes are ``[x, y, w, h]`` in pixels of the stored image, drawn as they are (the
image is not resized). Each phrase gets its own colour; the label is
``phrase score``. The output folder is a local path or a URI (``storage.fs``).
"""
from __future__ import annotations

import io
import re
from typing import Any

from storage import fs
from storage.arrow_view import iter_samples_with_images
from storage.records import GroundedSample, InvalidRecord, validate_sample
from storage.skips import StageCounts

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def draw_sample(sample: GroundedSample, image_bytes: bytes, box_indices: list[int] | None) -> bytes:
    """PNG bytes of the image with ``sample``'s boxes (only ``box_indices`` when given)."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(image_bytes)) as im:
        canvas = im.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    keep = set(range(len(sample.boxes))) if box_indices is None else set(box_indices)
    for i, box in enumerate(sample.boxes):
        if i not in keep:
            continue
        colour = PALETTE[box.phrase % len(PALETTE)] if box.phrase >= 0 else (255, 255, 255)
        x, y, w, h = box.bbox
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        text = (sample.phrases[box.phrase].text if 0 <= box.phrase < len(sample.phrases)
                else " ".join(sample.caption[s:e] for s, e in box.tokens_positive))
        label = f"{text} {box.score:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), label)
        ty = y - (bottom - top) - 2 if y - (bottom - top) - 2 >= 0 else y + 1
        draw.rectangle([x, ty, x + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text((x + 1, ty), label, fill=(0, 0, 0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def render(paths: list[str], targets: dict[tuple[str, str], list[int] | None], out_dir: str,
           counts: StageCounts) -> list[str]:
    """Render the samples named by ``targets`` ((file, key) -> box indices, None for all).

    Reads the sources again, with images (the tars: label tables hold none), and stops once
    every target is drawn. Returns the PNGs' paths (normalized, under ``out_dir``). A sample
    whose image cannot be found or decoded is a counted skip (``render_*``).
    """
    out_dir = fs.normalize(out_dir)
    fs.makedirs(out_dir)
    order = {t: i for i, t in enumerate(targets)}
    written: list[str] = []
    quiet = StageCounts()          # the first pass already counted the records' problems
    for d, image, file in iter_samples_with_images(paths, quiet):
        ident = (file, str(d.get("key")))
        if ident not in targets:
            continue
        where = f"{file} key {ident[1]}"
        if not image:
            counts.skip("render_no_image", where, "pass ANN.json=IMAGE_DIR to find images")
        else:
            try:
                sample, _ = validate_sample(GroundedSample.from_dict(d))
                png = draw_sample(sample, image, targets[ident])
            except (InvalidRecord, OSError, ValueError) as exc:   # PIL raises OSError for bad bytes
                counts.skip("render_bad_image", where, str(exc))
            else:
                name = f"{order[ident]:04d}_{re.sub(r'[^A-Za-z0-9_-]', '_', ident[1])[:80]}.png"
                fs.write_bytes(fs.join(out_dir, name), png)
                written.append(fs.join(out_dir, name))
        del targets[ident]
        if not targets:
            break
    for file, key in targets:      # its tar is gone or cut short before the sample
        counts.skip("render_sample_not_found", f"{file} key {key}", "the image could not be read")
    return written


def pick_targets(samples: Any, boxes: Any, per_sample: Any, room: int, with_filter: bool
                 ) -> dict[tuple[str, str], list[int] | None]:
    """The first ``room`` samples of a batch to render, with the box indices to draw.

    With a --where filter only samples with a matching box count, and only matching
    boxes are drawn (``boxes`` is the filtered box view); without one, every sample.
    """
    chosen: dict[tuple[str, str], list[int] | None] = {}
    keys = samples.column("key").to_pylist()
    files = samples.column("file").to_pylist()
    for i, n in enumerate(per_sample.tolist()):
        if len(chosen) >= room:
            break
        if with_filter and n == 0:
            continue
        chosen[(files[i], keys[i])] = [] if with_filter else None
    if with_filter and chosen:
        for key, file, idx in zip(boxes.column("key").to_pylist(), boxes.column("file").to_pylist(),
                                  boxes.column("box_index").to_pylist()):
            if (file, key) in chosen:
                chosen[(file, key)].append(idx)
    return chosen
