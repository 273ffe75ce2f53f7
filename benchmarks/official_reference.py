"""``make reference``: our ``glip-t`` with official-layout weights against what the official GLIP-T computes.

The official run (``../shared/data/official_glip/reference/reference_glip_t.pt``) used the weights that
``exercise_weights.py glip_t_state_dict.tsv 1`` writes, the image ``reference/input.png``, the caption
``a red ball and a blue box.`` and the phrases at characters [0, 10] and [15, 25]. This script writes the same
weights (928 MB, into ``--weights``, kept for re-runs), converts them with ``glipctl convert-official`` into a
temporary checkpoint directory, loads it with ``GLIP.from_pretrained``, runs ONE ``model.ground`` call with forward hooks on the modules whose official counterparts the reference
recorded, and prints a per-tensor table (max |ours - official|, relative to max |official|) and the detection
comparison. The table also goes to ``bench_out/official_reference.md``.

    python -m benchmarks.official_reference [--weights /tmp/glip_t_seed1.pth] [--threads N]

Exit status 0 when every tensor is within tolerance and the detections agree, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = REPO.parent / "shared" / "data" / "official_glip"
REFERENCE_FILE = OFFICIAL_DIR / "reference" / "reference_glip_t.pt"
IMAGE_FILE = OFFICIAL_DIR / "reference" / "input.png"
TABLE_T = OFFICIAL_DIR / "glip_t_state_dict.tsv"
CAPTION = "a red ball and a blue box."
SPANS = [(0, 10), (15, 25)]
SEED = 1
# float32 noise: the official run itself moves by ~1e-5 between 1 and 2 threads; deep stacks amplify a little
REL_TOL = 1e-4


# ------------------------------------------------------------------------------------------- reference inputs

def load_reference(path: Path = REFERENCE_FILE) -> dict:
    """The official run's record (a dict of tensors and lists; see the README beside it)."""
    return torch.load(path, weights_only=False, map_location="cpu")


def _exercise_module():
    spec = importlib.util.spec_from_file_location("exercise_weights", OFFICIAL_DIR / "exercise_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_official_weights(out: Path, seed: int = SEED) -> Path:
    """Run the official-layout weight generator (same TSV and seed -> same file) unless ``out`` exists."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run([sys.executable, str(OFFICIAL_DIR / "exercise_weights.py"), str(TABLE_T), str(seed),
                        str(tmp)], check=True, stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    return out


def official_weights_subset(wanted: Iterable[str], seed: int = SEED) -> dict[str, torch.Tensor]:
    """The generator's tensors for the official keys in ``wanted`` only (no ``module.`` prefix), without
    writing the 928 MB file: the generator's random stream is replayed in state-dict order up to the last
    wanted key. Identical values to the file's."""
    gen = _exercise_module()
    wanted = set(wanted)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for line in TABLE_T.read_text().splitlines():
        if len(out) == len(wanted):
            break
        key, shape, dtype = line.split("\t")
        shape = [int(s) for s in shape.split(",")] if shape else []
        value = gen.value(key, shape, dtype, g)   # every key in order: the random stream must advance exactly
        if key in wanted:
            out[key] = value.to(torch.int64 if dtype == "int64" else torch.float32)
    missing = wanted - set(out)
    if missing:
        raise KeyError(f"not in the official table: {sorted(missing)[:5]}")
    return out


# ------------------------------------------------------------------------------------------- comparison

@dataclass
class Row:
    """One compared tensor: ``max_abs`` = max |ours - official|, ``scale`` = max |official|,
    ``rel`` = max_abs / scale."""

    name: str
    shape: tuple
    max_abs: float
    scale: float
    ok: bool
    note: str = ""

    @property
    def rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


def compare(name: str, ours: torch.Tensor, official: torch.Tensor, rel_tol: float = REL_TOL) -> Row:
    ours = ours.detach().to(torch.float64).cpu()
    official = official.detach().to(torch.float64).cpu()
    if tuple(ours.shape) != tuple(official.shape):
        return Row(name, tuple(official.shape), math.inf, 0.0, False, f"shape ours {tuple(ours.shape)}")
    if ours.numel() == 0:
        return Row(name, tuple(official.shape), 0.0, 0.0, True)
    max_abs = float((ours - official).abs().max())
    scale = float(official.abs().max())
    return Row(name, tuple(official.shape), max_abs, scale, max_abs <= rel_tol * max(scale, 1e-6))


def exact(name: str, ours, official) -> Row:
    ok = ours == official
    return Row(name, (), 0.0 if ok else math.inf, 0.0, ok, "" if ok else f"ours {ours!r} vs official {official!r}")


def sha256_of(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def sample_rows(levels: list[torch.Tensor], index: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level [1, C, H, W] -> the rows [len(index_l), C] of the row-major (y*W+x) visual tokens."""
    return [lvl[0].flatten(1).T[idx] for lvl, idx in zip(levels, index)]


class Capture:
    """Forward hooks on our modules whose official counterparts the reference recorded."""

    def __init__(self, model):
        self.values: dict = {}
        self.handles = []
        tower = model.head.dyhead_tower
        self._hook(model.backbone, "backbone", with_inputs=True)
        self._hook(model.language_backbone, "language", with_inputs=True)
        self._hook(tower[0].b_attn, "b_attn0", with_inputs=True)
        self._hook(tower[0].b_attn.attn, "b_attn0_mha", with_inputs=True)
        self._hook(tower[len(tower) - 1], "tower_last")
        self._hook(model.head.dot_product_projection_text, "dot_proj_text")
        self._hook(model.head, "head")

    def _hook(self, module, name: str, with_inputs: bool = False) -> None:
        def hook(mod, args, output):
            self.values[name] = output
            if with_inputs:
                self.values[name + "_in"] = args
        self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run_ours(model, image_file: Path = IMAGE_FILE) -> tuple[dict, list]:
    """One ``model.ground`` call on the reference input with hooks; returns (captured, detections)."""
    from PIL import Image

    image = Image.open(image_file).convert("RGB")
    capture = Capture(model)
    try:
        with torch.no_grad():
            detections = model.ground([image], [CAPTION], [SPANS])
    finally:
        capture.close()
    return capture.values, detections[0]


def detection_rows(per_phrase: list[list[dict]], ref_pred: dict, plus_one: bool) -> tuple[list[Row], str]:
    """Match our detections (per phrase, xywh original pixels) with the official ones (xyxy, 1-based labels)."""
    one = 1.0 if plus_one else 0.0
    ours = []
    for label, dets in enumerate(per_phrase, start=1):
        for d in dets:
            x, y, w, h = d["bbox"]
            ours.append((label, d["score"], [x, y, x + w - one, y + h - one]))
    official = list(zip(ref_pred["labels"].tolist(), ref_pred["scores"].tolist(), ref_pred["boxes_xyxy"].tolist()))
    rows = [exact("detections: count", len(ours), len(official))]
    # canonical order on both sides: by label, then by score (desc), then by box
    key = lambda d: (d[0], -round(d[1], 4), [round(v, 1) for v in d[2]])  # noqa: E731
    ours_sorted, official_sorted = sorted(ours, key=key), sorted(official, key=key)
    matched, worst_box, worst_score = 0, 0.0, 0.0
    unmatched = []
    pool = list(ours_sorted)
    for label, score, box in official_sorted:
        best, best_d = None, math.inf
        for cand in pool:
            if cand[0] != label:
                continue
            d = max(abs(a - b) for a, b in zip(cand[2], box)) + abs(cand[1] - score) * 1000
            if d < best_d:
                best, best_d = cand, d
        if best is not None and max(abs(a - b) for a, b in zip(best[2], box)) < 0.05 and abs(best[1] - score) < 1e-3:
            pool.remove(best)
            matched += 1
            worst_box = max(worst_box, max(abs(a - b) for a, b in zip(best[2], box)))
            worst_score = max(worst_score, abs(best[1] - score))
        else:
            unmatched.append((label, round(score, 5), [round(v, 2) for v in box]))
    scale_box = max(max(abs(v) for v in b) for _, _, b in official) if official else 1.0
    rows.append(Row("detections: matched (same label, box within 0.05 px, score within 1e-3)", (len(official),),
                    float(len(official) - matched), float(len(official)), matched == len(official) == len(ours)))
    rows.append(Row("detections: boxes of matched (px)", (matched, 4), worst_box, scale_box,
                    worst_box <= 1e-3 * scale_box))
    rows.append(Row("detections: scores of matched", (matched,), worst_score, 1.0, worst_score <= 1e-4))
    note = ""
    if unmatched:
        note = (f"{len(unmatched)} official detections without a counterpart, e.g. {unmatched[:3]}; "
                f"ours left over: {[(l, round(s, 5)) for l, s, _ in pool[:3]]}")
    return rows, note


def compare_all(captured: dict, detections: list, ref: dict, model) -> tuple[list[Row], list[str]]:
    """Every recorded official tensor against ours. Returns (rows, notes)."""
    rows: list[Row] = []
    notes: list[str] = []
    n_valid = int(ref["attention_mask"].sum())

    # inputs
    batch = captured["backbone_in"][0]
    rows.append(exact("input tensor: padded shape", list(batch.shape), list(ref["image_tensor_shape_padded"])))
    rebuilt = _official_input_from_u8(ref)
    rows.append(compare("input tensor: values (vs the recorded resized uint8 image, normalized)", batch, rebuilt,
                        0.0))
    total = float(batch.double().sum())
    rows.append(Row("input tensor: float64 sum", (), abs(total - ref["image_tensor_sum"]),
                    abs(ref["image_tensor_sum"]), total == ref["image_tensor_sum"]))
    if sha256_of(batch) != ref["image_tensor_sha256"]:
        notes.append("the reference's image_tensor_sha256 hashes bytes in a layout we could not reproduce "
                     "(float32 C-order, NHWC, unpadded, torch.save and numpy.save all differ); the values and "
                     "their float64 sum are identical, which is what the rows above check")
    ids, mask = captured["language_in"][:2]
    rows.append(exact("token ids (valid)", ids[0, :n_valid].tolist(), ref["input_ids"][0, :n_valid].tolist()))
    rows.append(exact("attention mask: valid tokens", int(mask.sum()), n_valid))
    from glip.positive_map import spans_to_positive_map, tokenize
    tok = tokenize(model.tokenizer, [CAPTION], model.config.max_query_len, model.config.pad_to_max)
    pos = spans_to_positive_map(tok.offsets[0], [[s] for s in SPANS], ref["positive_map"].shape[1]).map
    rows.append(exact("positive map (token sets)", pos.nonzero().tolist(), (ref["positive_map"] > 0).nonzero().tolist()))

    # language backbone and the first fusion layer
    # the official language dict is mutated in place by the fusion tower, so the reference's `lang_hidden_valid`
    # holds the TOWER's text output (it equals `tower_lang_hidden_valid`); the BERT output itself is recorded as
    # `lang_embedded_valid` (= hidden x mask) and as the first fusion layer's input
    rows.append(compare("language backbone output (valid tokens)", captured["language"][:, :n_valid],
                        ref["lang_embedded_valid"]))
    v_in, l_in = captured["b_attn0_in"][0], captured["b_attn0_in"][1]
    rows.append(compare("b_attn0 input text (valid)", l_in[:, :n_valid], ref["b_attn0_in_lang_valid"]))
    v_out, l_out = captured["b_attn0"]
    shapes = [tuple(s[-2:]) for s in ref["fpn_shapes"]]
    rows.append(compare("b_attn0 output text (valid)", l_out[:, :n_valid], ref["b_attn0_out_lang_valid"]))
    v_out_levels = _split_levels(v_out, shapes)
    for lvl, (ours, official) in enumerate(zip(sample_rows(v_out_levels, ref["token_sample_index"]),
                                               ref["b_attn0_out_visual_sampled"])):
        rows.append(compare(f"b_attn0 output visual, level {lvl} (sampled)", ours, official))
    mha_v, mha_l = captured["b_attn0_mha_in"][0], captured["b_attn0_mha_in"][1]
    rows.append(compare("b_attn0 MHA input text (after LayerNorm, valid)", mha_l[:, :n_valid],
                        ref["b_attn0_mha_in_l_valid"]))
    delta_v, delta_l = captured["b_attn0_mha"]
    rows.append(compare("b_attn0 MHA delta text (valid)", delta_l[:, :n_valid], ref["b_attn0_mha_delta_l_valid"]))
    rows.append(compare("b_attn0 MHA delta visual (sampled)", delta_v[0][ref["b_attn0_mha_flat_sample_index"]],
                        ref["b_attn0_mha_delta_v_sampled"]))

    # FPN, the tower, the head
    fpn = captured["backbone"]
    rows.append(exact("FPN level shapes", [list(f.shape) for f in fpn], [list(s) for s in ref["fpn_shapes"]]))
    for lvl, (ours, official) in enumerate(zip(sample_rows(fpn, ref["token_sample_index"]), ref["fpn_sampled"])):
        rows.append(compare(f"FPN level {lvl} (sampled)", ours, official))
    tower_levels, tower_text = captured["tower_last"]
    for lvl, (ours, official) in enumerate(zip(sample_rows(tower_levels, ref["token_sample_index"]),
                                               ref["tower_visual_sampled"])):
        rows.append(compare(f"fusion tower output visual, level {lvl} (sampled)", ours, official))
    rows.append(compare("fusion tower output text (valid)", tower_text[:, :n_valid], ref["tower_lang_hidden_valid"]))
    rows.append(compare("dot-product projected text (valid)", captured["dot_proj_text"][:, :n_valid],
                        ref["dot_proj_text_valid"]))
    head = captured["head"]
    for lvl in range(len(ref["bbox_regression"])):
        rows.append(compare(f"box regression, level {lvl}", head.box_regression[lvl], ref["bbox_regression"][lvl]))
        rows.append(compare(f"centerness, level {lvl}", head.centerness[lvl], ref["centerness"][lvl]))
        rows.append(compare(f"token logits (valid tokens), level {lvl}", head.token_logits[lvl][:, :, :n_valid],
                            ref["dot_product_logits_valid_tokens"][lvl]))
    from glip.anchors import anchors_for_levels
    anchors = anchors_for_levels([tuple(f.shape[-2:]) for f in fpn], model.config.anchor_strides,
                                 model.config.anchor_sizes)
    for lvl, (ours, official) in enumerate(zip(anchors, ref["anchors_xyxy"])):
        rows.append(compare(f"anchors, level {lvl}", ours, official, 0.0))

    det_rows, note = detection_rows(detections, ref["pred_before_threshold"], model.config.legacy_box_plus_one)
    rows.extend(det_rows)
    if note:
        notes.append(note)

    # the official run also post-processed the same raw outputs at a low pre-NMS threshold, where the per-level
    # top-1000 cut binds: our post-processing on OUR raw outputs must give its detections too
    low = ref["low_threshold_variant"]
    (resized_w, resized_h) = low["selector_post_nms"]["image_size_wh"]
    per_phrase = detections_from_raw(head.token_logits, head.box_regression, head.centerness, anchors, model.config,
                                     model.tokenizer, low["MODEL.ATSS.INFERENCE_TH"], (resized_h, resized_w),
                                     tuple(low["pred_before_threshold"]["image_size_wh"]))
    det_rows, note = detection_rows(per_phrase, low["pred_before_threshold"], model.config.legacy_box_plus_one)
    rows.extend(Row(r.name.replace("detections", f"detections at threshold {low['MODEL.ATSS.INFERENCE_TH']}"),
                    r.shape, r.max_abs, r.scale, r.ok, r.note) for r in det_rows)
    if note:
        notes.append("low threshold: " + note)
    return rows, notes


def detections_from_raw(token_logits: list[torch.Tensor], box_regression: list[torch.Tensor],
                        centerness: list[torch.Tensor], anchors: list[torch.Tensor], config, tokenizer,
                        score_threshold: float, resized_hw: tuple[int, int], original_wh: tuple[int, int]):
    """Our post-processing (``glip.postprocess``) on one image's raw head outputs, as ``GLIP.ground`` runs it:
    per level token_logits [1, A, T], box_regression [1, 4, H, W], centerness [1, 1, H, W], anchors [A, 4].
    Returns per phrase (of SPANS) a list of {"bbox": xywh original pixels, "score"} as ``ground`` does."""
    from glip.anchors import BoxCoder
    from glip.positive_map import spans_to_positive_map, tokenize
    from glip.postprocess import postprocess_image

    tok = tokenize(tokenizer, [CAPTION], config.max_query_len, config.pad_to_max)
    phrase_tokens = spans_to_positive_map(tok.offsets[0], [[s] for s in SPANS], token_logits[0].shape[-1]).map
    det = postprocess_image([t[0] for t in token_logits], [r[0].permute(1, 2, 0).reshape(-1, 4) for r in box_regression],
                            [c[0].reshape(-1) for c in centerness], anchors, phrase_tokens, resized_hw,
                            BoxCoder(config.legacy_box_plus_one), score_threshold, config.pre_nms_top_n,
                            config.nms_threshold, config.detections_per_image, config.legacy_box_plus_one)
    one = 1.0 if config.legacy_box_plus_one else 0.0
    h, w = resized_hw
    scale = det.boxes.new_tensor([original_wh[0] / w, original_wh[1] / h] * 2)
    per_phrase: list[list[dict]] = [[] for _ in SPANS]
    for (x1, y1, x2, y2), score, label in zip((det.boxes * scale).tolist(), det.scores.tolist(), det.labels.tolist()):
        per_phrase[label].append({"bbox": [x1, y1, x2 - x1 + one, y2 - y1 + one], "score": score})
    return per_phrase


def _split_levels(v: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Concatenated visual tokens [1, N, C] -> per level [1, C, H, W]."""
    out, start = [], 0
    for h, w in shapes:
        out.append(v[:, start:start + h * w].transpose(1, 2).reshape(1, -1, h, w))
        start += h * w
    return out


def _official_input_from_u8(ref: dict) -> torch.Tensor:
    """The official network input rebuilt from the recorded resized BGR uint8 image (ToTensor, x255, Normalize,
    zero-pad to the recorded padded shape)."""
    u8 = ref["resized_image_u8_hwc_bgr"]
    x = u8.permute(2, 0, 1).float().div(255) * 255
    mean = torch.tensor([103.53, 116.28, 123.675])[:, None, None]
    std = torch.tensor([57.375, 57.12, 58.395])[:, None, None]
    x = (x - mean) / std
    _, _, h_pad, w_pad = ref["image_tensor_shape_padded"]
    return torch.nn.functional.pad(x, (0, w_pad - x.shape[-1], 0, h_pad - x.shape[-2]))[None]


# ------------------------------------------------------------------------------------------- report

def render(rows: list[Row], notes: list[str], timings: dict[str, float]) -> str:
    bad = [r for r in rows if not r.ok]
    lines = ["## Official GLIP-T reference (`make reference`)", "",
             f"Our `glip-t` with the official-layout weights of `exercise_weights.py` (seed {SEED}), converted by "
             f"`glip.convert`, on `reference/input.png` with the caption `{CAPTION}` and spans {SPANS}, against "
             "the official model's own numbers (`reference_glip_t.pt`, commit 9dda955, CPU). "
             f"Tolerance: max |ours - official| <= {REL_TOL:g} x max |official| per tensor (float32 noise; the "
             "official run moves by ~1e-5 between thread counts); exact for inputs, anchors and counts.", "",
             f"**{len(rows) - len(bad)} / {len(rows)} checks within tolerance.** Timings (this machine, shared "
             "CPU, so noisy): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ".", "",
             "| tensor | shape | max abs diff | max abs official | relative | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(str(s) for s in r.shape) if r.shape else ""
        rel = "" if r.scale == 0 and r.max_abs == 0 else f"{r.rel:.2e}"
        lines.append(f"| {r.name} | {shape} | {r.max_abs:.3g} | {r.scale:.3g} | {rel} | "
                     f"{'yes' if r.ok else '**NO**'} {r.note} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "glip_t_seed1.pth",
                        help="official-layout weights file (written by exercise_weights.py when missing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "official_reference.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    import json

    from glip import GLIP
    from pipelines.commands import convert_official

    timings = {}
    t = time.perf_counter()
    write_official_weights(args.weights)
    timings["weights"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="glip_reference_") as tmp:
        # the user's path: `glipctl convert-official` writes a checkpoint directory, which is loaded back
        t = time.perf_counter()
        convert_official.main(args.weights, out=Path(tmp) / "glip_t", preset="auto",
                              report=Path(tmp) / "report.json")
        timings["convert-official"] = time.perf_counter() - t
        report = json.loads((Path(tmp) / "report.json").read_text())
        t = time.perf_counter()
        model = GLIP.from_pretrained(Path(tmp) / "glip_t")
        timings["from_pretrained"] = time.perf_counter() - t
    t = time.perf_counter()
    captured, detections = run_ours(model)
    timings["forward + post-processing"] = time.perf_counter() - t
    ref = load_reference()
    rows, notes = compare_all(captured, detections, ref, model)
    rows.insert(0, Row(f"conversion report: {len(report['consumed'])} consumed, {len(report['ignored'])} ignored, "
                       f"{len(report['unmapped'])} unmapped, {len(report['mismatched'])} mismatched, "
                       f"{len(report['not_filled'])} of ours not filled", (), 0.0, 0.0, bool(report["ok"])))
    text = render(rows, notes, timings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
