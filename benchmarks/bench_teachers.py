"""Benchmark: labeling images/s of each teacher family through the ``Teacher`` protocol (issue 15).

Families: GLIP (``glip.GLIP.from_preset("tiny")``), Grounding DINO, MM Grounding DINO and OWLv2 (the tiny
random transformers models of ``tests/hf_models.py``, saved with ``save_pretrained`` like hub checkpoints).
Each is loaded with ``labeling.teacher.load_teacher`` and timed on ``Teacher.ground``, the call a
pseudo-label actor makes, at batch 8 with one torch thread (each CPU actor gets one CPU), in fp32 and
in bf16 (CPU autocast), after one warm-up batch. The images are generated 640x480 scenes (random
background, a few coloured rectangles), resized by the teacher's own ``teacher_resize`` before the clock
starts (a pipeline's CPU tasks do that); each image gets a real Flickr8k caption and the phrase spans
spaCy finds in it (``labeling.phrases``), as ``glipctl parse-captions`` would.

The configs are tiny and random: the numbers compare the cost of the families' pipelines (tokenizing,
preprocessing, the network's structure, post-processing), not of the real models. With a GPU, the real
sizes (GLIP-T, Grounding DINO-T, MM Grounding DINO-T, OWLv2-B/16, random weights) at their default input
sizes are measured too (``_gpu_section``).

Run alone: ``python -m benchmarks.run teachers`` (``GLIPCTL_BENCH_QUICK=1`` for a short run).
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS_TSV = REPO.parent / "shared" / "data" / "flickr8k_captions.tsv"
BATCH_SIZE = 8
THRESHOLD = 0.05
NMS_IOU = 0.6
MAX_PER_PHRASE = 10
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480
FAMILIES = ("GLIP", "Grounding DINO", "MM Grounding DINO", "OWLv2")
PRECISIONS = ("fp32", "bf16")
# The one-size comparison: a 640x480 image at 426x320 for every family (OWLv2's --image-size is its square side).
COMMON_SIDE = 320
COMMON_SIZES = {"GLIP": COMMON_SIDE, "Grounding DINO": COMMON_SIDE, "MM Grounding DINO": COMMON_SIDE,
                "OWLv2": COMMON_SIDE * 4 // 3}


# ----------------------------------------------------------------------------------------- inputs
def _captions(n: int, stride: int = 97) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """``n`` Flickr8k captions (every ``stride``-th row) with at least one spaCy phrase, and their spans."""
    from labeling.phrases import PhraseExtractor, clean_caption, load_spacy

    with open(CAPTIONS_TSV, encoding="utf-8", newline="") as fh:
        rows = [row["caption"] for row in csv.DictReader(fh, delimiter="\t")]
    candidates = [c for c in (clean_caption(r)[0] for r in rows[::stride][: 2 * n]) if c]
    extractor = PhraseExtractor(load_spacy())
    captions, spans = [], []
    for caption, phrases in zip(candidates, extractor.extract_batch(candidates)):
        if phrases:
            captions.append(caption)
            spans.append([(int(p["start"]), int(p["end"])) for p in phrases])
        if len(captions) == n:
            break
    return captions, spans


def _images(n: int, seed: int = 0):
    """``n`` RGB PIL images of 640x480: a random background and 2-4 rectangles of random colours."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = np.empty((IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        for _ in range(int(rng.integers(2, 5))):
            w, h = int(rng.integers(60, 300)), int(rng.integers(60, 240))
            x, y = int(rng.integers(0, IMAGE_WIDTH - w)), int(rng.integers(0, IMAGE_HEIGHT - h))
            pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(Image.fromarray(pixels))
    return out


# ----------------------------------------------------------------------------------------- teachers
def _hf_models():
    """The tests' transformers model builders (``tests/hf_models.py``, not a package: imported by path)."""
    import importlib

    sys.path.insert(0, str(REPO / "tests"))
    try:
        return importlib.import_module("hf_models")
    finally:
        sys.path.remove(str(REPO / "tests"))


def _tiny_teachers(root: Path) -> dict[str, Path]:
    """Family name -> saved tiny random teacher folder."""
    import torch

    hf_models = _hf_models()

    from glip import GLIP

    torch.manual_seed(0)
    GLIP.from_preset("tiny").save_pretrained(root / "glip")
    return {"GLIP": root / "glip",
            "Grounding DINO": hf_models.build_gdino(root / "gdino"),
            "MM Grounding DINO": hf_models.build_gdino(root / "mm_gdino", model_type="mm-grounding-dino"),
            "OWLv2": hf_models.build_owlv2(root / "owlv2")}


def _real_teachers(root: Path) -> dict[str, tuple[str, Path]]:
    """Family name -> (what it is, saved folder): the real sizes with random weights, default input sizes.

    GLIP-T with a randomly initialised BERT-base (``text_pretrained=False``); Grounding DINO-T and MM Grounding
    DINO-T from their config classes' defaults (Swin-T, BERT-base, 900 queries, 800/1333 px) with the MiniLM
    package's tokenizer (bert-base-uncased's vocabulary); OWLv2-B/16 (``Owlv2Config`` defaults with
    ``google/owlv2-base-patch16``'s 960 px vision input) with the byte-level CLIP tokenizer of the tests (its
    ids fit CLIP's 49,408-token embedding; queries are padded to the 16 text positions either way)."""
    import torch
    from transformers import (GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection,
                              Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor)

    from glip import GLIP

    hf_models = _hf_models()
    torch.manual_seed(0)
    out: dict[str, tuple[str, Path]] = {}
    GLIP.from_preset("glip-t", text_pretrained=False).save_pretrained(root / "glip_t")
    out["GLIP"] = ("GLIP-T (Swin-T, BERT-base)", root / "glip_t")
    for family, name, config_cls, model_cls in (
            ("Grounding DINO", "gdino_t", GroundingDinoConfig, GroundingDinoForObjectDetection),
            ("MM Grounding DINO", "mm_gdino_t", MMGroundingDinoConfig, MMGroundingDinoForObjectDetection)):
        folder = root / name
        model_cls(config_cls()).eval().save_pretrained(folder)
        GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                               tokenizer=hf_models._minilm_tokenizer()).save_pretrained(folder)
        out[family] = (f"{family}-T (Swin-T, BERT-base)", folder)
    tokenizer = hf_models.clip_byte_tokenizer(model_max_length=16)
    config = Owlv2Config(text_config=dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=0),
                         vision_config=dict(image_size=960, patch_size=16))
    folder = root / "owlv2_b16"
    Owlv2ForObjectDetection(config).eval().save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 960, "width": 960}),
                   tokenizer=tokenizer).save_pretrained(folder)
    out["OWLv2"] = ("OWLv2-B/16 (ViT-B/16, 960 px)", folder)
    return out


# ----------------------------------------------------------------------------------------- timing
def _label_rate(path: Path, images, captions, spans, device: str, precision: str, batches: int,
                min_seconds: float, image_size: int | None = None) -> dict:
    """Images/s of ``Teacher.ground`` at ``BATCH_SIZE``, after one warm-up batch; the input size it used.

    ``images``: PIL images, at least ``(batches + 1) * BATCH_SIZE`` (the first batch warms up); resized by
    ``teacher_resize(path, image_size)`` (None: the teacher's default size) before the clock starts. The
    ``batches`` timed batches are cycled until ``min_seconds`` have passed, so that fast teachers are timed
    over more than a few milliseconds. On the CPU with one torch thread."""
    import torch

    from labeling.teacher import load_teacher, teacher_resize

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        resize = teacher_resize(path, image_size)
        count = (batches + 1) * BATCH_SIZE
        arrays = [resize(image) for image in images[:count]]
        sizes = [image.size for image in images[:count]]
        teacher = load_teacher(path, device=device, precision=precision)

        def label(lo: int) -> int:
            hi = lo + BATCH_SIZE
            found = teacher.ground(arrays[lo:hi], sizes[lo:hi], captions[lo:hi], spans[lo:hi], threshold=THRESHOLD,
                                   nms_iou=NMS_IOU, max_per_phrase=MAX_PER_PHRASE)
            return sum(len(dets) for per_image in found for dets in per_image)

        label(0)
        if device != "cpu":
            torch.cuda.synchronize()
        done = boxes = 0
        start = time.perf_counter()
        while done < batches or time.perf_counter() - start < min_seconds:
            boxes += label((done % batches + 1) * BATCH_SIZE)
            done += 1
            if device != "cpu":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    h, w = arrays[0].shape[:2]
    net_h, net_w = teacher.bucket_of(arrays[0])
    return {"ips": done * BATCH_SIZE / seconds, "seconds": seconds, "boxes": boxes,
            "resized": f"{w}x{h}", "input": f"{net_w}x{net_h}"}


def _table(rates: dict[str, dict[str, dict]], names: dict[str, str]) -> list[str]:
    base = rates["GLIP"]["fp32"]["ips"]
    lines = ["| family | model | resized to (w x h) | network input (w x h) | fp32 images/s | bf16 images/s | "
             "bf16 vs fp32 | fp32 vs GLIP |", "|---|---|---|---|---:|---:|---:|---:|"]
    for family, by_precision in rates.items():
        fp32, bf16 = by_precision["fp32"], by_precision["bf16"]
        lines.append(f"| {family} | {names[family]} | {fp32['resized']} | {fp32['input']} | {fp32['ips']:.2f} | "
                     f"{bf16['ips']:.2f} | {bf16['ips'] / fp32['ips']:.2f}x | {fp32['ips'] / base:.2f}x |")
    return lines


_TINY_NAMES = {"GLIP": "`tiny` preset (ResNet 16-128, MiniLM-L6, 2 fusion layers)",
               "Grounding DINO": "tests/hf_models.py `build_gdino` (ResNet 8-16, d_model 32, 1-layer BERT, 24 queries)",
               "MM Grounding DINO": "tests/hf_models.py `build_gdino(model_type=\"mm-grounding-dino\")` (same sizes)",
               "OWLv2": "tests/hf_models.py `build_owlv2` (1-layer ViT of width 32, 16 px patches, 1-layer text model)"}


def run(quick: bool) -> str:
    batches, min_seconds = (1, 0.5) if quick else (3, 2.0)
    images = _images((batches + 1) * BATCH_SIZE)
    captions, spans = _captions((batches + 1) * BATCH_SIZE)
    root = Path(tempfile.mkdtemp(prefix="bench_teachers_"))
    try:
        teachers = _tiny_teachers(root)

        def rates_at(sizes: dict[str, int] | None) -> dict[str, dict[str, dict]]:
            """Family -> precision -> ``_label_rate``, at ``sizes[family]`` (None: each teacher's default)."""
            return {family: {p: _label_rate(teachers[family], images, captions, spans, "cpu", p, batches,
                                            min_seconds, sizes[family] if sizes else None)
                             for p in PRECISIONS} for family in FAMILIES}

        default, common = rates_at(None), rates_at(COMMON_SIZES)
        gpu = _gpu_section(images, captions, spans, root, batches, min_seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    phrases = sum(len(s) for s in spans) / len(spans)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        "## Teachers: labeling images/s by family",
        "",
        f"`Teacher.ground` (`labeling.teacher.load_teacher`, the call a pseudo-label actor makes) on generated "
        f"{IMAGE_WIDTH}x{IMAGE_HEIGHT} images, batch {BATCH_SIZE}, after one warm-up batch ({batches} timed "
        f"batch{'es' if batches > 1 else ''} of different images, cycled for at least {min_seconds:g} s); each "
        f"image with a real Flickr8k caption and its spaCy phrases ({phrases:.1f} phrases per caption on "
        f"average); threshold {THRESHOLD}, NMS {NMS_IOU}, at most {MAX_PER_PHRASE} boxes per phrase. CPU, one "
        f"torch thread (like a CPU actor); bf16 is CPU autocast. Images resized by each teacher's own "
        f"`teacher_resize` before the clock starts.",
        "",
        "**Tiny random configs**: these numbers are the relative cost of the families' pipelines "
        "(tokenization, preprocessing, network structure, post-processing) at toy widths, not the cost of "
        "the real models, whose relative speed is the GPU measurement's question.",
        "",
        "At each tiny config's own input size (GLIP tiny 320/512; the tiny Grounding DINOs' processor 64/96; "
        "the tiny OWLv2 a 96 px square), as a real checkpoint keeps its own:",
        "",
        *_table(default, _TINY_NAMES),
        "",
        f"At one input size: every image resized to the same {COMMON_SIDE * 4 // 3}x{COMMON_SIDE} "
        f"(`--image-size {COMMON_SIDE}` for GLIP and the Grounding DINOs; OWLv2 `--image-size "
        f"{COMMON_SIZES['OWLv2']}`, its square side, so the image is the same and only the padding differs):",
        "",
        *_table(common, _TINY_NAMES),
        "",
        f"Measured with a 1-minute load average of {load:.1f} on this machine ({os.cpu_count()} cores shared with "
        f"other jobs): the numbers are noisy. GLIP runs the same input size in both tables, so the gap "
        f"between its two rows is the noise of this run.",
        "",
        gpu,
    ])


def _gpu_section(images, captions, spans, root: Path, batches: int, min_seconds: float) -> str:
    """The real-size families (``_real_teachers``) on the GPU, fp32 and bf16, when a GPU exists."""
    import torch

    if not torch.cuda.is_available():
        return ("GPU: not measured: no GPU lent to this task (on a GPU, `make bench` measures GLIP-T vs "
                "Grounding DINO-T vs MM Grounding DINO-T vs OWLv2-B/16 at their real sizes with random weights "
                "and default input sizes, fp32 and bf16, batch 8).")
    try:
        teachers = _real_teachers(root / "real")
        rates = {family: {p: _label_rate(path, images, captions, spans, "cuda", p, batches, min_seconds)
                          for p in PRECISIONS} for family, (_, path) in teachers.items()}
    except Exception as exc:   # report, do not lose the CPU numbers above
        return f"GPU: the real-size measurement failed: `{type(exc).__name__}: {exc}`"
    names = {family: name for family, (name, _) in teachers.items()}
    return "\n".join([
        f"GPU ({torch.cuda.get_device_name(0)}): the real sizes with random weights, default input sizes, "
        f"batch {BATCH_SIZE}, same images and captions.",
        "",
        *_table(rates, names),
    ])
