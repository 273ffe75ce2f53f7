"""Evaluation of a grounding model: COCO detection AP (zero-shot, category names as the
prompt) and phrase-grounding Recall@k (Flickr30K Entities protocol). No Ray.

Boxes everywhere here are COCO ``[x, y, w, h]`` in original-image pixels, which is what
``GLIP.ground`` returns and what pycocotools expects. Annotation files, image folders and
models are local paths or URIs (``storage.fs``). A model is a ``glip.GLIP`` or a transformers
zero-shot detector (``labeling.hf_teacher.HFGrounder``: Grounding DINO, MM Grounding DINO,
OWLv2; a folder or a hub id), both with the same ``ground`` surface.

The COCO prompt can carry a manual template (``storage.prompt_template``: words around each
name, whose span still covers the name only), and a GLIP can carry a tuned prompt
(``labeling.prompts.TunedPrompt``, attached by the caller): the data's category prompt must then
be the very prompt it was tuned on (``check_tuned_prompt``).

Recall@k protocol (documented choice): a phrase counts as recalled at k when ANY of the
model's k best boxes for it has IoU >= 0.5 with ANY of its ground-truth boxes (the
"any-box" protocol of MDETR's ``FlickrEvaluator`` with ``merge_boxes=False``, which GLIP
reports). ``merge_boxes=True`` instead compares against the union box of all the phrase's
ground-truth boxes (the Flickr30K Entities "merged" protocol). Phrases without any ground
truth box are not counted.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from storage import fs
from storage.coco import category_name, category_prompts  # the same prompts training builds for detection data
from storage.errors import InputError
from storage.skips import StageCounts

log = logging.getLogger("glipctl.evaluate")

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DEFAULT_KS = (1, 5, 10)
MAX_DETS_PER_IMAGE = 100            # COCO's maxDets


# ----------------------------------------------------------------------------- prompts
# Category names are joined "circle. square. star." and split into several prompts over the
# model's token limit, as GLIP does for LVIS: ``storage.coco.category_prompts``.

def model_token_counter(model) -> Callable[[str], int] | None:
    """Count tokens the way ``model`` will (its tokenizer, special tokens included)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    return lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])


# ----------------------------------------------------------------------------- box math

def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``a`` [N, 4] and ``b`` [M, 4], both xywh pixels -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1, ax2, ay2 = a[:, 0], a[:, 1], a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1, bx2, by2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(ax1[:, None], bx1[None]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(ay1[:, None], by1[None]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def merge_xywh(boxes: Sequence[Sequence[float]]) -> list[float]:
    """The smallest xywh box enclosing all ``boxes``."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1 = arr[:, 0].min(), arr[:, 1].min()
    x2, y2 = (arr[:, 0] + arr[:, 2]).max(), (arr[:, 1] + arr[:, 3]).max()
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


# ----------------------------------------------------------------------------- metrics

def coco_metrics(coco_gt, detections: list[dict[str, Any]], image_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """COCOeval bbox metrics for ``detections`` (COCO result dicts: image_id, category_id, bbox, score).

    ``coco_gt`` is a ``pycocotools.coco.COCO`` or a path to the annotation JSON. Returns AP, AP50,
    AP75, APs, APm, APl (fractions in [0, 1]; -1 where COCO has nothing to measure, e.g. APl
    without any large object) and ``per_category``: {category name: AP, -1 for a category
    without ground truth in these images}. No detections at all are evaluated by COCOeval too
    (an empty result set): 0 where there are objects to find, -1 where there are none.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from storage.goldg import load_coco_api

    if not isinstance(coco_gt, COCO):
        coco_gt = load_coco_api(coco_gt)
    ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    with contextlib.redirect_stdout(io.StringIO()):
        # pycocotools' loadRes cannot take an empty list (it reads the first result's keys)
        coco_dt = coco_gt.loadRes([dict(d) for d in detections]) if detections else _no_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {k: float(v) for k, v in zip(COCO_STAT_NAMES, ev.stats[:6])}
    # precision: [T IoU thresholds, R recall points, K categories, A areas, M maxDets]
    precision = ev.eval["precision"]
    per_cat = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_cat[names[cat_id]] = float(p.mean()) if p.size else -1.0
    out["per_category"] = per_cat
    out["images"] = len(ids)
    out["detections"] = len(detections)
    return out


def _no_results(coco_gt):
    """An empty COCO result set over ``coco_gt``'s images and categories (what ``loadRes`` would give)."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset.get("images", [])), "annotations": [],
                     "categories": list(coco_gt.dataset.get("categories", []))}
    empty.createIndex()
    return empty


def recall_at_k(predictions: list[list[list[float]]], ground_truth: list[list[list[float]]],
                ks: Sequence[int] = DEFAULT_KS, iou_threshold: float = 0.5,
                merge_boxes: bool = False) -> dict[str, Any]:
    """Recall@k over phrases.

    ``predictions[i]`` is phrase i's predicted boxes (xywh, best first); ``ground_truth[i]`` its
    gold boxes (xywh). See the module docstring for the any-box / merged protocols.
    Returns ``{"R@1": .., "R@5": .., "R@10": .., "phrases": n}``.
    """
    hits = {k: 0 for k in ks}
    counted = 0
    for preds, gts in zip(predictions, ground_truth):
        if not gts:
            continue
        counted += 1
        gt = [merge_xywh(gts)] if merge_boxes else gts
        if not preds:
            continue
        ious = iou_xywh(np.asarray(preds[:max(ks)]), np.asarray(gt)).max(axis=1)
        first_hit = next((r for r, v in enumerate(ious) if v >= iou_threshold), None)
        for k in ks:
            if first_hit is not None and first_hit < k:
                hits[k] += 1
    out: dict[str, Any] = {f"R@{k}": (hits[k] / counted if counted else 0.0) for k in ks}
    out["phrases"] = counted
    return out


# ----------------------------------------------------------------------------- model runs

def _open_rgb(path: str, counts: StageCounts):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(fs.read_bytes(path))) as im:
            return im.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        counts.skip("unreadable_image", str(path), repr(exc))
        return None


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]


def detect_coco(model, ann_json: str | Path, image_root: str | Path, *, batch_size: int = 8,
                threshold: float | None = None, max_tokens: int | None = None, counts: StageCounts | None = None,
                progress: Callable[[int], None] | None = None, template=None,
                tuned_prompt=None) -> tuple[list[dict[str, Any]], list[int], Any]:
    """Zero-shot detection of every COCO category on every image of ``ann_json``.

    Each image is grounded against every category prompt (category names split over the
    model's token limit); each category's span yields scored boxes that become COCO results.
    ``threshold=None`` is the official protocol (GLIP's post-processor: the 0.05 candidate cut
    and the best 100 boxes per image and prompt); a number keeps every box scoring at least it.
    ``template``: a ``storage.prompt_template.PromptTemplate``, the words around each name (its
    span, the box's category, still covers the name only). ``tuned_prompt``: a
    ``labeling.prompts.TunedPrompt`` the caller attached to ``model``; the dataset's category
    prompt must then be the one it was tuned on (``check_tuned_prompt``).
    Returns (detections, evaluated image ids, the COCO ground truth object).
    """
    from storage.goldg import load_coco_api

    counts = counts if counts is not None else StageCounts()
    coco_gt = load_coco_api(ann_json)   # InputError when it is not a readable COCO file
    if not coco_gt.getCatIds():
        raise InputError(f"{ann_json}: no categories")
    categories = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    limit = max_tokens or int(getattr(getattr(model, "config", None), "max_query_len", 256))
    prompts = category_prompts(categories, limit, model_token_counter(model), template)
    if tuned_prompt is not None:
        check_tuned_prompt(tuned_prompt, prompts, [category_name(c) for c in categories], str(ann_json))
    image_infos = coco_gt.loadImgs(sorted(coco_gt.getImgIds()))
    detections: list[dict[str, Any]] = []
    evaluated: list[int] = []
    for batch in _batches(image_infos, batch_size):
        images, infos = [], []
        for info in batch:
            counts.read += 1
            img = _open_rgb(fs.join(fs.normalize(image_root), info["file_name"]), counts)
            if img is not None:
                images.append(img)
                infos.append(info)
        if not images:
            continue
        per_image: list[list[dict[str, Any]]] = [[] for _ in images]
        for (caption, spans), results in zip(prompts, _ground_prompts(model, images, prompts, threshold)):
            for i, per_phrase in enumerate(results):
                for (_, _, cat_id), boxes in zip(spans, per_phrase):
                    for b in boxes:
                        per_image[i].append({"image_id": int(infos[i]["id"]), "category_id": cat_id,
                                             "bbox": [float(v) for v in b["bbox"]], "score": float(b["score"])})
        for info, dets in zip(infos, per_image):
            dets.sort(key=lambda d: -d["score"])
            detections.extend(dets[:MAX_DETS_PER_IMAGE])
            evaluated.append(int(info["id"]))
            counts.written += 1
        if progress:
            progress(len(batch))
    return detections, evaluated, coco_gt


def check_tuned_prompt(tuned, prompts: list[tuple[str, list[tuple[int, int, int]]]], names: list[str],
                       where: str) -> None:
    """``InputError`` unless ``prompts`` (``category_prompts`` of the data named ``where``, whose
    categories are ``names``) is exactly the one prompt ``tuned`` was tuned on: the same caption and
    the same category spans. Other categories are named as such (``TunedPrompt.check_categories``)."""
    built = [(caption, [(s, e) for s, e, _ in spans]) for caption, spans in prompts]
    if built == [(tuned.caption, tuned.spans)]:
        return
    if names != [category_name({"name": n}) for n in tuned.category_names]:
        tuned.check_categories(names, where)
    shown = " | ".join(repr(caption) for caption, _ in built)
    raise InputError(f"{tuned.option} {tuned.path} was tuned on the prompt {tuned.caption!r}; the categories of "
                     f"{where} make {len(built)} prompt(s): {shown}. The offsets are tied to that text: the same "
                     f"categories in the same order, the same template, one prompt within the model's token limit")


def _ground_prompts(model, images: list, prompts: list[tuple[str, list[tuple[int, int, int]]]],
                    threshold: float | None) -> Iterable[list[list[list[dict[str, Any]]]]]:
    """Per prompt, ``model.ground`` of every image with that prompt. A model whose image side does not
    depend on the text (OWLv2: ``reuses_image_features``) grounds all prompts in one image-encoder pass
    (``ground_prompts``, the same detections); GLIP-family models run each prompt."""
    plain = [(caption, [(s, e) for s, e, _ in spans]) for caption, spans in prompts]
    if getattr(model, "reuses_image_features", False):
        yield from model.ground_prompts(images, plain, threshold=threshold)
        return
    for caption, spans in plain:
        yield model.ground(images, [caption] * len(images), [spans] * len(images), threshold=threshold)


def evaluate_coco(model, ann_json: str | Path, image_root: str | Path, *, template=None, tuned_prompt=None,
                  detections_out: str | None = None, **kwargs) -> dict[str, Any]:
    """``detect_coco`` + ``coco_metrics``: the numbers ``glipctl evaluate --coco`` reports
    (``template`` and ``tuned_prompt`` as in ``detect_coco``). ``detections_out``: also write the
    detections COCOeval scored there (a JSON list in COCO's results format; a path or URI)."""
    counts = kwargs.pop("counts", None) or StageCounts()
    detections, evaluated, coco_gt = detect_coco(model, ann_json, image_root, counts=counts, template=template,
                                                 tuned_prompt=tuned_prompt, **kwargs)
    if not evaluated:
        raise InputError(f"{ann_json}: none of its images could be read under {image_root}")
    if detections_out is not None:
        fs.write_json(detections_out, detections, indent=None)
    metrics = coco_metrics(coco_gt, detections, evaluated)
    metrics["counts"] = counts.to_dict()
    return metrics


def evaluate_grounding(model, ann_json: str | Path, image_root: str | Path, *, batch_size: int = 8,
                       ks: Sequence[int] = DEFAULT_KS, merge_boxes: bool = False,
                       counts: StageCounts | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Recall@k on MDETR/GoldG data: each caption's phrases (the spans of its gold boxes)
    are grounded with the whole caption as the prompt; see ``recall_at_k`` for the protocol."""
    from storage.goldg import load_mdetr

    counts = counts if counts is not None else StageCounts()
    samples = list(load_mdetr(ann_json, image_root, counts))
    if not samples:
        raise InputError(f"{ann_json}: no usable grounding samples")
    predictions: list[list[list[float]]] = []
    ground_truth: list[list[list[float]]] = []
    for batch in _batches(samples, batch_size):
        images, captions, spans, gts = [], [], [], []
        for s in batch:
            img = _open_rgb(s.extra["image_path"], counts)
            if img is None:
                continue
            # one phrase per distinct gold span set; its gold boxes are all boxes sharing it
            groups: dict[tuple, list[list[float]]] = {}
            for b in s.boxes:
                groups.setdefault(tuple(tuple(t) for t in b.tokens_positive), []).append(list(b.bbox))
            if not groups:
                continue
            images.append(img)
            captions.append(s.caption)
            # a phrase of several spans is grounded from its first to its last character
            spans.append([(min(t[0] for t in key), max(t[1] for t in key)) for key in groups])
            gts.append(list(groups.values()))
        if not images:
            continue
        results = model.ground(images, captions, spans, threshold=0.0, max_per_phrase=max(ks))
        for per_phrase, gt in zip(results, gts):
            for boxes, gold in zip(per_phrase, gt):
                predictions.append([list(b["bbox"]) for b in boxes])
                ground_truth.append(gold)
            counts.written += 1
        if progress:
            progress(len(batch))
    out = recall_at_k(predictions, ground_truth, ks=ks, merge_boxes=merge_boxes)
    out["protocol"] = "merged-box" if merge_boxes else "any-box"
    out["images"] = counts.written
    out["counts"] = counts.to_dict()
    return out


def load_model(path: str | Path, device: str | None = None):
    """A model in eval mode: GLIP from a glipctl checkpoint directory or an official ``.pth``; a
    transformers zero-shot detector (``HFGrounder``) from its folder (``config.json`` ``model_type``
    grounding-dino, mm-grounding-dino, owlv2) or a hub id. Local or a URI (a remote model is copied
    into the local cache once, without a training run's optimizer state:
    ``storage.checkpoints.local_model``). ``device``: move it there (``InputError`` when torch
    cannot use that device).

    Raises InputError when ``path`` does not exist or cannot be loaded as a model.
    """
    model = _load_model(path)
    return model if device is None else move_model(model, device)


def move_model(model, device: str):
    """``model`` (GLIP or ``HFGrounder``) moved to ``device``; InputError when torch cannot use it."""
    from labeling.teacher import TeacherDeviceError, check_device

    try:
        check_device(device)
        return model.to(device)
    except (TeacherDeviceError, RuntimeError, ValueError) as exc:
        raise InputError(f"--device {device}: {exc}") from None


def _load_model(path: str | Path):
    import glip

    from labeling.hf_teacher import hf_model_type, is_hub_id, load_hf_grounder
    from storage.checkpoints import local_model

    if is_hub_id(str(path)):
        return load_hf_grounder(str(path)).eval()
    if fs.kind_of(path) is None:
        raise InputError(f"--model {path}: no such checkpoint")
    if fs.is_dir(path) and fs.is_file(fs.join(path, "config.json")) and hf_model_type(fs.normalize(path)):
        return load_hf_grounder(local_model(path)).eval()
    loader = getattr(glip, "load_teacher", None)
    try:
        local = local_model(path)
        model = loader(local) if loader is not None else glip.GLIP.from_pretrained(local)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--model {path}: not a loadable GLIP checkpoint ({exc})") from exc
    return model.eval()
