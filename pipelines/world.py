"""A deterministic generated world for the demo: shapes on cluttered backgrounds.

One seed gives, byte for byte, the same three datasets:

* ``gold/``     a small human-quality grounding set in MDETR/GoldG JSON (captions whose
                ``tokens_positive`` spans name every object);
* ``crawled/``  a larger web-like set in img2dataset webdataset layout (``00000.tar`` with
                ``{key}.jpg/.txt/.json``, ``00000.parquet``, ``00000_stats.json``): images and
                noisy alt-text only, no boxes;
* ``crawled_truth.json``  the true objects of each crawled image (key -> shape, colour,
                bbox), which no stage reads: the demo scores the teacher's pseudo-labels with it;
* ``eval/``     a COCO detection JSON (one category per shape) and, on the same images, an
                MDETR grounding JSON for Recall@k.

The point of the world is the situation the GLIP paper's student exploits: some shapes
(``RARE_SHAPES``) are scarce in gold (about 2% of its objects each) but as common as any
other in the crawled captions. A teacher trained on gold detects them poorly in the
evaluation set, where every shape competes, yet grounds "a star" in a crawled image well
enough, where the caption says what is there and only 1-3 objects compete; the student
trained on those pseudo-labels learns the shape. The evaluation set has every shape equally
often and the detection prompt names shapes only, so it measures exactly that.

Crawled phrases seldom say the colour (30%), and a crawled image never repeats one: measured
(bench_out/demo.md), when 90% of them did, the student fitted "a red star" through "red" (the
frozen text encoder's contextual embedding of "star" carries its adjective) and never learned
the shape word the evaluation prompt uses.

A concept the world never names: ``NOVEL_SHAPES`` ("moon", a crescent) can be drawn but no
gold, crawled or evaluation image shows it and no caption or category says it, so a model
pretrained on the world has neither seen nor read it. ``generate_transfer_task`` writes a
small downstream detection dataset (COCO ``train.json``/``test.json``, every shape of
``SHAPES + NOVEL_SHAPES`` equally often) in which it is one category among the known ones:
the GLIP paper's few-shot transfer to new categories, where prompt tuning, a linear probe
and full fine-tuning are compared on how much of a new concept each learns from a few
labelled images. Its generators are seeded apart from the world's (``_TRANSFER_STREAMS``),
so adding it changed no byte of any world.

Coordinates: boxes are COCO ``[x, y, w, h]`` in pixels of the stored image (tight bounds of
the drawn mask). Images are RGB JPEGs, 128-192 px a side.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from storage.atomic import atomic_path, atomic_write, write_json_atomic
from storage.records import Box, GroundedSample, Phrase

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
RARE_SHAPES = ("star", "heart")
NOVEL_SHAPES = ("moon",)    # drawable, but only in the transfer task: the world never shows or names it
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 160, 60), "blue": (35, 75, 215),
    "yellow": (235, 205, 30), "purple": (135, 55, 175), "orange": (245, 135, 25),
}
TEXTURES = ("plain", "striped", "dotted")
SIZES = {"small": (20, 30), "": (30, 44), "large": (44, 60)}   # object side in pixels

# Alt-text noise: phrases that name nothing in the picture, and wrappers around the real ones.
NOISE_PHRASES = ("free shipping", "my collection", "the weekend", "our online store", "your desktop",
                 "a great gift idea", "high quality", "the best price", "my kids", "this summer")
CRAWLED_TEMPLATES = (
    "{a}",
    "photo of {a}",
    "{a} on a plain background, {noise}",
    "IMG_{n}.JPG: {a}",
    "Check out {a} and {b} in {noise}!!",
    "stock photo: {a} and {b}",
    "{bare} wallpaper for {noise}",
    "{bare} sticker, {noise}",
    "{a} next to {b}",
    "cute {bare} and {b} for {noise}",
)


@dataclass(frozen=True)
class WorldSpec:
    """Sizes and mixtures of the generated world; everything else follows from ``seed``."""
    seed: int = 0
    gold_images: int = 800
    crawled_images: int = 1200
    eval_images: int = 120
    crawled_shard_size: int = 300
    min_side: int = 128
    max_side: int = 192
    max_objects: int = 3                # per gold and eval image
    crawled_max_objects: int = 3        # per crawled image: co-occurring shapes are each other's negatives
    rare_shapes: tuple[str, ...] = RARE_SHAPES
    gold_rare_weight: float = 0.08      # relative to 1.0 for each common shape
    crawled_rare_weight: float = 1.5    # rare shapes a little more common than others on the web
    gold_phrase_colour: float = 0.5     # share of gold phrases that say the colour
    crawled_phrase_colour: float = 0.3  # share of crawled object phrases that say the colour (see above)
    crawled_omit_object: float = 0.1    # alt-text that forgets the second object

    @classmethod
    def small(cls, seed: int = 0) -> "WorldSpec":
        """A world small enough for the test suite (seconds to generate and train on)."""
        return cls(seed=seed, gold_images=48, crawled_images=48, eval_images=16, crawled_shard_size=24)

    def scaled(self, **overrides: Any) -> "WorldSpec":
        return replace(self, **overrides)


@dataclass
class WorldObject:
    shape: str
    colour: str
    texture: str
    size: str
    bbox: list[float]          # [x, y, w, h] pixels

    def noun_phrase(self, with_size: bool = True, with_texture: bool = True, with_colour: bool = True) -> str:
        words = []
        if with_size and self.size:
            words.append(self.size)
        if with_texture and self.texture != "plain":
            words.append(self.texture)
        if with_colour:
            words.append(self.colour)
        words.append(self.shape)
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article] + words)


@dataclass
class WorldPaths:
    """Where ``generate_world`` put each dataset (all under ``root``)."""
    root: Path
    gold_json: Path
    gold_images: Path
    crawled_dir: Path
    eval_coco_json: Path
    eval_grounding_json: Path
    eval_images: Path
    crawled_truth: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def gold_arg(self) -> str:
        """``ANN.json=IMAGE_DIR`` as the CLI takes it."""
        return f"{self.gold_json}={self.gold_images}"

    @property
    def eval_coco_arg(self) -> str:
        return f"{self.eval_coco_json}={self.eval_images}"

    @property
    def eval_grounding_arg(self) -> str:
        return f"{self.eval_grounding_json}={self.eval_images}"


@dataclass(frozen=True)
class TransferSpec:
    """Sizes of the downstream transfer task; everything else follows from ``seed``.

    ``categories`` are COCO category ids 1..N in this order; each object is any of them with
    equal probability, dealt from shuffled decks so a split has all of them equally often.
    """
    seed: int = 0
    train_images: int = 240
    test_images: int = 120
    categories: tuple[str, ...] = SHAPES + NOVEL_SHAPES
    max_objects: int = 3                # per image, at least 1
    min_side: int = 128
    max_side: int = 192

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in SHAPES + NOVEL_SHAPES]
        if not self.categories or unknown or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct shapes of {SHAPES + NOVEL_SHAPES}, "
                             f"got {self.categories!r}")

    @classmethod
    def small(cls, seed: int = 0) -> "TransferSpec":
        """A transfer task small enough for the test suite."""
        return cls(seed=seed, train_images=24, test_images=12)


@dataclass
class TransferPaths:
    """Where ``generate_transfer_task`` put each split (all under ``root``)."""
    root: Path
    train_json: Path
    train_images: Path
    test_json: Path
    test_images: Path
    summary: dict[str, Any] = field(default_factory=dict)   # objects per split and category

    @property
    def train_arg(self) -> str:
        """``ANN.json=IMAGE_DIR`` as the CLI takes it."""
        return f"{self.train_json}={self.train_images}"

    @property
    def test_arg(self) -> str:
        return f"{self.test_json}={self.test_images}"


# ----------------------------------------------------------------------------- drawing

def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        ang = rot - math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + r * x / 17.0, cy - r * y / 17.0))
    return pts


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def _cross(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    a, b = r, r * 0.36
    base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]


def _moon(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rot: float) -> None:
    """A crescent: the disc of radius ``r`` minus a smaller one offset towards angle ``rot``."""
    cut_r, offset = r * 0.85, r * 0.5
    ox, oy = cx + offset * math.cos(rot), cy + offset * math.sin(rot)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    draw.ellipse([ox - cut_r, oy - cut_r, ox + cut_r, oy + cut_r], fill=0)


def _shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, side: float,
                rng: np.random.Generator) -> Image.Image:
    """An L-mode mask (255 inside) of one shape whose extent is about ``side`` pixels."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    r = side / 2
    rot = float(rng.uniform(-0.3, 0.3))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.polygon(_regular(cx, cy, r * 1.3, 4, math.pi / 4 + rot), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular(cx, cy + r * 0.15, r * 1.15, 3, -math.pi / 2 + rot), fill=255)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1, rot), fill=255)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=255)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r, rot), fill=255)
    elif shape == "moon":
        _moon(draw, cx, cy, r, rot)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture_fill(texture: str, colour: tuple[int, int, int], size: tuple[int, int],
                  rng: np.random.Generator) -> Image.Image:
    jitter = rng.integers(-18, 19, size=3)
    base = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    fill = Image.new("RGB", size, base)
    if texture == "plain":
        return fill
    light = tuple(int(c + (255 - c) * 0.75) for c in base)
    draw = ImageDraw.Draw(fill)
    w, h = size
    if texture == "striped":
        period = int(rng.integers(5, 8))
        for k in range(-h, w + h, period):
            draw.line([(k, 0), (k + h, h)], fill=light, width=2)
    elif texture == "dotted":
        period = int(rng.integers(5, 8))
        for y in range(0, h, period):
            for x in range((y // period % 2) * period // 2, w, period):
                draw.ellipse([x, y, x + 2, y + 2], fill=light)
    return fill


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Pale noisy gradient with grey clutter: lines, specks and blobs that are no shape."""
    w, h = size
    tint = rng.integers(205, 246, size=3).astype(np.float32)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None] * rng.uniform(-14, 14)
    noise = rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    arr = np.clip(tint[None, None, :] + gy + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):       # clutter lines
        g = int(rng.integers(90, 190))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, 1, 4) * [w, h, w, h])
        draw.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):       # grey blobs
        g = int(rng.integers(120, 200))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        r = float(rng.uniform(3, 8))
        draw.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=(g, g, g - 10))
    return img


def _draw_scene(objects_spec: list[tuple[str, str, str, str]], rng: np.random.Generator,
                min_side: int, max_side: int) -> tuple[bytes, int, int, list[WorldObject]]:
    """Render one image, each side a multiple of 8 in [min_side, max_side] pixels.

    Returns JPEG bytes, width, height and the placed objects (an object that finds no free
    place is left out).
    """
    w = int(rng.integers(min_side // 8, max_side // 8 + 1)) * 8
    h = int(rng.integers(min_side // 8, max_side // 8 + 1)) * 8
    img = _background((w, h), rng)
    placed: list[WorldObject] = []
    taken: list[tuple[float, float, float, float]] = []
    for shape, colour, texture, size_word in objects_spec:
        lo, hi = SIZES[size_word]
        for _attempt in range(30):   # rejection sampling: objects do not overlap
            side = float(rng.uniform(lo, hi))
            cx = float(rng.uniform(side * 0.65, w - side * 0.65))
            cy = float(rng.uniform(side * 0.65, h - side * 0.65))
            box = (cx - side * 0.7, cy - side * 0.7, cx + side * 0.7, cy + side * 0.7)
            if all(box[2] < t[0] or box[0] > t[2] or box[3] < t[1] or box[1] > t[3] for t in taken):
                break
        else:
            continue
        mask = _shape_mask(shape, (w, h), cx, cy, side, rng)
        bounds = mask.getbbox()
        if bounds is None:
            continue
        taken.append(box)
        img.paste(_texture_fill(texture, COLOURS[colour], (w, h), rng), (0, 0), mask)
        x0, y0, x1, y1 = bounds
        placed.append(WorldObject(shape, colour, texture, size_word,
                                  [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), w, h, placed


def _weighted_shapes(rng: np.random.Generator, rare_shapes: tuple[str, ...],
                     rare_weight: float) -> Callable[[], str]:
    """Each call draws one of ``SHAPES``, a rare one with weight ``rare_weight``, any other 1.0."""
    weights = np.array([rare_weight if s in rare_shapes else 1.0 for s in SHAPES])
    weights = weights / weights.sum()
    return lambda: str(rng.choice(SHAPES, p=weights))


def _dealt_shapes(rng: np.random.Generator, shapes: tuple[str, ...]) -> Callable[[], str]:
    """Each call deals the next of ``shapes`` from successive shuffled decks of all of them.

    Every shape is equally likely at each call, and any ``k * len(shapes)`` calls from the
    start give each exactly ``k`` times: a small split still has every shape, equally often.
    """
    def decks() -> Iterator[str]:
        while True:
            yield from (str(s) for s in rng.permutation(list(shapes)))
    return decks().__next__


def _pick_objects(rng: np.random.Generator, n: int, next_shape: Callable[[], str],
                  distinct_colours: bool) -> list[tuple[str, str, str, str]]:
    """``n`` objects, shapes from ``next_shape``; with ``distinct_colours`` a colour word always
    names exactly one of them."""
    if distinct_colours:
        colours = rng.permutation(list(COLOURS))[:n]
    else:
        colours = rng.choice(list(COLOURS), size=n)
    out = []
    for colour in colours:
        shape = next_shape()
        texture = str(rng.choice(TEXTURES, p=[0.6, 0.2, 0.2]))
        size_word = str(rng.choice(list(SIZES), p=[0.3, 0.4, 0.3]))
        out.append((shape, str(colour), texture, size_word))
    return out


# ----------------------------------------------------------------------------- captions

def gold_caption(objects: list[WorldObject], rng: np.random.Generator | None = None,
                 spec: WorldSpec | None = None) -> tuple[str, list[tuple[int, int]]]:
    """"a small red circle, a square and a striped green star." plus one span per object.

    With ``rng``, each phrase says its colour with probability ``spec.gold_phrase_colour``
    (and size, texture half the time): colours repeat within a gold image, so only the shape
    word tells the objects apart, which is what makes a model learn shapes rather than colours.
    """
    if rng is None or spec is None:
        parts = [o.noun_phrase() for o in objects]
    else:
        parts = [o.noun_phrase(with_size=bool(rng.random() < 0.5), with_texture=bool(rng.random() < 0.5),
                               with_colour=bool(rng.random() < spec.gold_phrase_colour)) for o in objects]
    caption, spans = "", []
    for i, part in enumerate(parts):
        if i > 0:
            caption += " and " if i == len(parts) - 1 else ", "
        spans.append((len(caption), len(caption) + len(part)))
        caption += part
    return caption + ".", spans


def crawled_caption(objects: list[WorldObject], rng: np.random.Generator, spec: WorldSpec) -> str:
    """Alt-text: the objects (not always all, not always with colour) wrapped in web noise."""
    def phrase(o: WorldObject) -> str:
        return o.noun_phrase(with_size=bool(rng.random() < 0.3), with_texture=bool(rng.random() < 0.5),
                             with_colour=bool(rng.random() < spec.crawled_phrase_colour))
    names = [phrase(o) for o in objects]
    if len(names) > 1 and rng.random() < spec.crawled_omit_object:
        names = names[:1]
    templates = [t for t in CRAWLED_TEMPLATES if ("{b}" in t) == (len(names) > 1)]
    template = str(rng.choice(templates))
    bare = names[0].split(" ", 1)[1]      # without its article: "red star sticker"
    text = template.format(a=names[0], bare=bare, b=names[1] if len(names) > 1 else "",
                           noise=str(rng.choice(NOISE_PHRASES)), n=int(rng.integers(1000, 9999)))
    if len(names) > 2:
        text += f", {names[2]}"
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text


# ----------------------------------------------------------------------------- writers

def _write_mdetr(samples: list[GroundedSample], path: Path) -> None:
    """MDETR/GoldG JSON through the storage writer (file names from ``extra["file_name"]``)."""
    from storage.goldg import write_mdetr

    write_mdetr(samples, path)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # fixed metadata: same seed, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_crawled_shard(out_dir: Path, shard_index: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One img2dataset webdataset-mode shard: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{shard_index:05d}"
    with atomic_path(out_dir / f"{name}.tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in records:
                _tar_add(tar, f"{r['key']}.jpg", r["jpg"])
                _tar_add(tar, f"{r['key']}.txt", r["caption"].encode("utf-8"))
                _tar_add(tar, f"{r['key']}.json", json.dumps(r["meta"], sort_keys=True).encode("utf-8"))
    table = pa.table({col: [r["meta"][col] for r in records] for col in records[0]["meta"]})
    with atomic_path(out_dir / f"{name}.parquet") as tmp:
        pq.write_table(table, tmp)
    stats = {"count": len(records), "successes": len(records), "failed_to_download": 0,
             "failed_to_resize": 0, "status_dict": {"success": len(records)}, "start_time": 0.0,
             "end_time": 0.0, "duration": 0.0}
    write_json_atomic(out_dir / f"{name}_stats.json", stats)
    return stats


def _coco_annotations(objects: list[WorldObject], image_id: int, first_id: int,
                      categories: tuple[str, ...]) -> list[dict[str, Any]]:
    """COCO detection annotations of one image's objects, ids from ``first_id``; an object's
    ``category_id`` is its shape's 1-based position in ``categories``."""
    anns = []
    for k, o in enumerate(objects):
        x, y, bw, bh = o.bbox
        anns.append({"id": first_id + k, "image_id": image_id, "category_id": categories.index(o.shape) + 1,
                     "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    return anns


def _write_coco(path: Path, description: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                categories: tuple[str, ...]) -> None:
    """A COCO detection JSON with one category per shape, ids 1..N in ``categories`` order."""
    write_json_atomic(path, {
        "info": {"description": description},
        "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(categories)],
    })


# ----------------------------------------------------------------------------- world

def _objects_to_sample(key: str, file_name: str, width: int, height: int, objects: list[WorldObject],
                       source: str, rng: np.random.Generator | None = None,
                       spec: WorldSpec | None = None) -> GroundedSample:
    caption, spans = gold_caption(objects, rng, spec)
    phrases = [Phrase(caption[s:e], s, e, o.shape) for (s, e), o in zip(spans, objects)]
    boxes = [Box(list(o.bbox), [[s, e]], i, 1.0) for i, ((s, e), o) in enumerate(zip(spans, objects))]
    return GroundedSample(key, caption, width, height, phrases, boxes, source, {"file_name": file_name})


def _count_shapes(objects: list[WorldObject], counts: dict[str, int]) -> None:
    for o in objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1


def generate_world(out_dir: str | Path, spec: WorldSpec = WorldSpec()) -> WorldPaths:
    """Write gold, crawled and eval sets under ``out_dir``; same ``spec`` -> same bytes.

    A world already in ``out_dir`` (it has ``world.json``) is removed first, so no file of an
    older, larger world (a crawled shard the new one does not have) survives to be read.

    Each split draws from its own generator seeded by (``spec.seed``, split), so changing
    the size of one split never changes the others.
    """
    root = Path(out_dir)
    if (root / "world.json").exists():
        shutil.rmtree(root)
    paths = WorldPaths(root=root, gold_json=root / "gold" / "mdetr_gold.json", gold_images=root / "gold" / "images",
                       crawled_dir=root / "crawled", eval_coco_json=root / "eval" / "coco_eval.json",
                       eval_grounding_json=root / "eval" / "mdetr_eval.json", eval_images=root / "eval" / "images",
                       crawled_truth=root / "crawled_truth.json")
    for d in (paths.gold_images, paths.crawled_dir, paths.eval_images):
        d.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"spec": asdict(spec), "shapes": {"gold": {}, "crawled": {}, "eval": {}}}

    # gold: every object named, with its span
    rng = np.random.default_rng([spec.seed, 1])
    gold_shape = _weighted_shapes(rng, spec.rare_shapes, spec.gold_rare_weight)
    gold = []
    for i in range(spec.gold_images):
        n = int(rng.integers(1, spec.max_objects + 1))
        jpg, w, h, objects = _draw_scene(_pick_objects(rng, n, gold_shape, False), rng,
                                         spec.min_side, spec.max_side)
        file_name = f"gold_{i:06d}.jpg"
        with atomic_write(paths.gold_images / file_name) as fh:
            fh.write(jpg)
        gold.append(_objects_to_sample(f"world/{i}/0", file_name, w, h, objects, "goldg/flickr", rng, spec))
        _count_shapes(objects, summary["shapes"]["gold"])
    _write_mdetr(gold, paths.gold_json)

    # crawled: images + alt-text, no boxes (img2dataset keys: shard index then row, 9 digits)
    rng = np.random.default_rng([spec.seed, 2])
    crawled_shape = _weighted_shapes(rng, spec.rare_shapes, spec.crawled_rare_weight)
    records: list[dict[str, Any]] = []
    truth: dict[str, list[dict[str, Any]]] = {}   # never read by a stage: scores pseudo-labels
    shard = 0
    for i in range(spec.crawled_images):
        n = int(rng.integers(1, spec.crawled_max_objects + 1))
        jpg, w, h, objects = _draw_scene(_pick_objects(rng, n, crawled_shape, True), rng,
                                         spec.min_side, spec.max_side)
        caption = crawled_caption(objects, rng, spec)
        key = f"{shard:05d}{len(records):04d}"
        meta = {"url": f"https://shapes.example/{spec.seed}/{i}.jpg", "key": key, "status": "success",
                "error_message": None, "caption": caption, "width": w, "height": h,
                "original_width": w, "original_height": h, "sha256": None}
        records.append({"key": key, "jpg": jpg, "caption": caption, "meta": meta})
        truth[key] = [{"shape": o.shape, "colour": o.colour, "bbox": o.bbox} for o in objects]
        _count_shapes(objects, summary["shapes"]["crawled"])
        if len(records) == spec.crawled_shard_size or i == spec.crawled_images - 1:
            _write_crawled_shard(paths.crawled_dir, shard, records)
            shard, records = shard + 1, []

    write_json_atomic(paths.crawled_truth, truth)

    # eval: every shape equally likely; COCO detection JSON + MDETR grounding JSON, same images
    rng = np.random.default_rng([spec.seed, 3])
    eval_shape = _weighted_shapes(rng, spec.rare_shapes, 1.0)
    coco_images, coco_anns, grounding = [], [], []
    for i in range(spec.eval_images):
        n = int(rng.integers(1, spec.max_objects + 1))
        jpg, w, h, objects = _draw_scene(_pick_objects(rng, n, eval_shape, False), rng,
                                         spec.min_side, spec.max_side)
        file_name = f"eval_{i:06d}.jpg"
        with atomic_write(paths.eval_images / file_name) as fh:
            fh.write(jpg)
        coco_images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        coco_anns += _coco_annotations(objects, i + 1, len(coco_anns) + 1, SHAPES)
        grounding.append(_objects_to_sample(f"world-eval/{i}/0", file_name, w, h, objects, "goldg/flickr"))
        _count_shapes(objects, summary["shapes"]["eval"])
    _write_coco(paths.eval_coco_json, f"glipctl generated world, seed {spec.seed}", coco_images, coco_anns, SHAPES)
    _write_mdetr(grounding, paths.eval_grounding_json)

    summary["images"] = {"gold": spec.gold_images, "crawled": spec.crawled_images, "eval": spec.eval_images}
    summary["rare_shapes"] = list(spec.rare_shapes)
    for split in summary["shapes"]:
        summary["shapes"][split] = dict(sorted(summary["shapes"][split].items()))
    write_json_atomic(root / "world.json", summary)
    paths.summary = summary
    return paths


# ----------------------------------------------------------------------------- transfer task

_TRANSFER_STREAMS = {"train": 101, "test": 102}   # generator tags apart from the world's (1, 2, 3)


def generate_transfer_task(out_dir: str | Path, spec: TransferSpec = TransferSpec()) -> TransferPaths:
    """Write the transfer task's COCO detection splits under ``out_dir``; same ``spec`` -> same bytes.

    Layout: ``train/`` and ``test/`` hold the JPEGs, ``train.json`` and ``test.json`` their
    COCO annotations (categories ``spec.categories``, ids 1..N; boxes ``[x, y, w, h]`` pixels,
    tight around the drawn mask). Images are drawn like the world's evaluation set; each object
    is any category with equal probability, dealt from shuffled decks of ``spec.categories``
    (``_dealt_shapes``), so even a small split has every category about equally often (within
    one, less the ~5% of objects that find no free place in a crowded image). Each split has
    its own generator seeded by (``spec.seed``, ``_TRANSFER_STREAMS[split]``): sizing one
    split changes neither the other nor any world.

    A split's JSON is written after all its images, so a JSON on disk means a complete split;
    a split already there (its JSON exists) is removed first, so no image of an older, larger
    one survives.
    """
    root = Path(out_dir)
    paths = TransferPaths(root=root, train_json=root / "train.json", train_images=root / "train",
                          test_json=root / "test.json", test_images=root / "test")
    summary: dict[str, Any] = {"spec": asdict(spec), "objects": {}}
    splits = (("train", spec.train_images, paths.train_json, paths.train_images),
              ("test", spec.test_images, paths.test_json, paths.test_images))
    for split, n_images, ann_json, image_dir in splits:
        if ann_json.exists():
            ann_json.unlink()
            shutil.rmtree(image_dir, ignore_errors=True)
        image_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([spec.seed, _TRANSFER_STREAMS[split]])
        next_shape = _dealt_shapes(rng, spec.categories)
        images, anns = [], []
        counts = dict.fromkeys(spec.categories, 0)
        for i in range(n_images):
            n = int(rng.integers(1, spec.max_objects + 1))
            jpg, w, h, objects = _draw_scene(_pick_objects(rng, n, next_shape, False), rng,
                                             spec.min_side, spec.max_side)
            file_name = f"{split}_{i:06d}.jpg"
            with atomic_write(image_dir / file_name) as fh:
                fh.write(jpg)
            images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
            anns += _coco_annotations(objects, i + 1, len(anns) + 1, spec.categories)
            _count_shapes(objects, counts)
        _write_coco(ann_json, f"glipctl transfer task {split}, seed {spec.seed}", images, anns, spec.categories)
        summary["objects"][split] = counts
    paths.summary = summary
    return paths
