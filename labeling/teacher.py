"""The teacher: a model that grounds caption phrases in images, and its identity.

``Teacher`` is the protocol the pseudo-label stage programs against; ``GLIPTeacher``
wraps ``glip.GLIP.ground``, ``labeling.hf_teacher.HFTeacher`` a transformers zero-shot
detector (Grounding DINO, MM Grounding DINO, OWLv2); ``load_teacher`` picks one for a path.
The work is split so that a pipeline can overlap CPU and accelerator work:

- ``TeacherResize`` (picklable, no model loaded): decoded RGB PIL image -> resized
  ``uint8`` array ``[h, w, 3]``, the resize the teacher's own preprocessing does
  (GLIP: ``GLIP.prepare_image``, shorter side to ``min_size``, longer side at most
  ``max_size``; transformers models: their image processor's size rule). Runs in cheap CPU tasks.
- ``Teacher.ground`` (where the model lives): those arrays plus the original sizes,
  captions and phrase spans -> per image, per phrase, detections
  ``{"bbox": [x, y, w, h], "score": float}`` in ORIGINAL image pixels (COCO xywh), best first.

Teachers, by ``--teacher`` value (``_teacher_kind``):

- a glipctl checkpoint folder (``config.json`` without ``model_type``): "glipctl";
- an official GLIP ``.pth`` (also ``.pt``/``.bin``/``.ckpt``): "official";
- a transformers model folder whose ``config.json`` ``model_type`` is grounding-dino,
  mm-grounding-dino or owlv2: "transformers";
- a Hugging Face hub id (``owner/name`` or ``owner/name@revision``) that is not an existing
  local path: "transformers", resolved through the hub cache (``huggingface_hub``; offline
  when ``HF_HUB_OFFLINE=1`` and the model is cached). A relative path that does not exist
  locally and looks like ``owner/name`` is taken for a hub id; the error then says both.

Identity: the sha256 of the checkpoint (``checkpoint_sha256``; for a hub id, of the files of its
resolved snapshot that the model loads from, plus the commit as ``revision``) and the model type,
recorded in the manifest and every pseudo-labeled sample, so a label can always be traced to the
weights that made it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from storage.errors import InputError

Detection = dict[str, Any]                 # {"bbox": [x, y, w, h] pixels, "score": float}
PhraseSpans = Sequence[tuple[int, int]]    # character spans into one caption, end exclusive

# Files of a glipctl checkpoint directory that do NOT define the model's predictions
# (optimizer/scheduler state for resuming training): left out of the identity hash.
_NON_MODEL_FILES = {"train_state.pt"}
_HASH_CHUNK = 1 << 20
# GLIP's official test-time sizes (configs/pretrain/*.yaml INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST).
OFFICIAL_MIN_SIZE, OFFICIAL_MAX_SIZE = 800, 1333


# ----------------------------------------------------------------------------- identity
def _file_sha256(path: str) -> str:
    from storage import fs

    h = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(path: str | Path, include: Callable[[str], bool] | None = None) -> str:
    """sha256 identifying a checkpoint (a local path or a URI).

    A file (official ``.pth``): the sha256 of its bytes, the number people compare
    with ``sha256sum``. A glipctl checkpoint directory: the sha256 of the sorted lines
    ``"<relative path> <sha256 of file>\\n"`` over every file that defines the model
    (config, weights, tokenizer), leaving out training-resume state and hidden files.
    The same checkpoint gives the same number on a laptop disk and in a bucket. ``include(relative
    path)``: only the files it accepts (a hub snapshot: the files a model is loaded from).
    """
    from storage import fs

    path = fs.normalize(path)
    if fs.is_file(path):
        return _file_sha256(path)
    lines = []
    for entry in fs.list_dir(path, recursive=True):
        parts = entry.name.split("/")
        if parts[-1] in _NON_MODEL_FILES or any(part.startswith(".") for part in parts):
            continue
        if include is not None and not include(entry.name):
            continue
        lines.append(f"{entry.name} {_file_sha256(entry.path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


HF_KIND = "transformers"


@dataclass(frozen=True)
class TeacherIdentity:
    """Which weights made a pseudo-label.

    ``model_type``: "glip", or the transformers ``model_type`` (grounding-dino, mm-grounding-dino,
    owlv2). ``revision``: the hub commit a hub id resolved to ("" for local checkpoints)."""
    path: str
    sha256: str
    kind: str            # "glipctl" (checkpoint directory), "official" (.pth file) or "transformers"
    model_type: str = "glip"
    revision: str = ""

    @property
    def short(self) -> str:
        return self.sha256[:12]

    @property
    def source(self) -> str:
        """The ``source`` of every sample this teacher labels: ``pseudo/<short sha256>``."""
        return f"pseudo/{self.short}"

    def to_dict(self) -> dict[str, str]:
        out = {"path": self.path, "sha256": self.sha256, "kind": self.kind, "model_type": self.model_type,
               "source": self.source}
        if self.revision:
            out["revision"] = self.revision
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherIdentity":
        return cls(str(d["path"]), str(d["sha256"]), str(d["kind"]), str(d.get("model_type") or "glip"),
                   str(d.get("revision") or ""))

    def sample_extra(self) -> dict[str, str]:
        """What every pseudo-labeled sample records about its teacher (``extra``)."""
        out = {"teacher_sha256": self.sha256, "teacher_kind": self.kind, "teacher_model_type": self.model_type}
        if self.revision:
            out["teacher_revision"] = self.revision
        return out


_OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def normalize_teacher(path: str | Path) -> str:
    """The canonical ``--teacher`` string: a hub id as given, anything else ``fs.normalize``d."""
    from labeling.hf_teacher import is_hub_id
    from storage import fs

    text = str(path)
    return text if is_hub_id(text) else fs.normalize(text)


def _teacher_kind(path: str) -> str:
    """"glipctl", "official" or "transformers" for the teacher at ``path``; ``InputError`` naming what is
    wrong."""
    from labeling.hf_teacher import hf_model_type, is_hub_id
    from storage import fs

    if is_hub_id(path):
        return HF_KIND
    kind = fs.kind_of(path)
    if kind is None:
        raise InputError(f"{path}: teacher checkpoint not found")
    if kind == "dir":
        if not fs.is_file(fs.join(path, "config.json")):
            raise InputError(f"{path}: not a glipctl checkpoint (no config.json); "
                             f"pass a checkpoint directory, an official GLIP .pth or a transformers "
                             f"zero-shot detector (folder or hub id)")
        return HF_KIND if hf_model_type(path) is not None else "glipctl"
    if fs.suffix_of(path) in _OFFICIAL_SUFFIXES:
        return "official"
    raise InputError(f"{path}: not a teacher checkpoint (expected a glipctl checkpoint directory, "
                     f"an official GLIP .pth or a transformers zero-shot detector)")


def check_teacher(path: str | Path) -> str:
    """Refuse, in the driver, a teacher no actor could load; returns its kind.

    A checkpoint folder needs its config.json; a file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``)
    must be an official GLIP-T/GLIP-L checkpoint that ``glip.convert`` reads (memory-mapped,
    ``weights_only``); a transformers model needs a supported ``model_type``, its processor and
    weights (``labeling.hf_teacher.check_hf_teacher``). Raises ``InputError``.
    """
    path = normalize_teacher(path)
    kind = _teacher_kind(path)
    if kind == HF_KIND:      # a supported model_type, a processor and weights (nothing is loaded)
        from labeling.hf_teacher import check_hf_teacher

        check_hf_teacher(path)
    if kind == "official":   # memory-mapped: the weights are not read, only the keys and shapes
        from glip.convert import detect_preset, load_official_state_dict
        from storage import fs

        local = fs.local_copy(path)
        detect_preset(load_official_state_dict(local), path)
    return kind


def teacher_identity(path: str | Path) -> TeacherIdentity:
    """Identify the teacher at ``path`` (local, URI or hub id); ``InputError`` when it is not a checkpoint."""
    path = normalize_teacher(path)
    kind = _teacher_kind(path)
    if kind == HF_KIND:
        from labeling.hf_teacher import hf_identity

        return hf_identity(path)
    return TeacherIdentity(path, checkpoint_sha256(path), kind)


# ----------------------------------------------------------------------------- CPU resize
RESIZE_RULES = ("glip", "detr", "longer")


def detr_resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(new_width, new_height)`` by transformers' ``get_size_with_aspect_ratio`` (the Grounding DINO
    image processor's ``{"shortest_edge", "longest_edge"}``): GLIP's rule, except that a capped longer side
    is computed from the unrounded shorter side (1000x100 at 800/1333 -> 1333x133, where GLIP gives 1330)."""
    short, long = float(min(width, height)), float(max(width, height))
    size, raw = int(min_size), None
    if max_size is not None and long / short * size > max_size:
        raw = max_size * short / long
        size = int(round(raw))
    if (height <= width and height == size) or (width <= height and width == size):
        return width, height
    if width < height:
        return size, int((raw if raw is not None else size) * height / width)
    return int((raw if raw is not None else size) * width / height), size


def longer_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``(new_width, new_height)`` with the longer side exactly ``side`` and the aspect ratio kept (the
    shorter side rounded, at least 1): what OWLv2's processor makes of an image once padded to a square."""
    if width >= height:
        return side, max(1, int(round(height * side / width)))
    return max(1, int(round(width * side / height))), side


@dataclass(frozen=True)
class TeacherResize:
    """The teacher's own resize without the model (picklable, for CPU tasks).

    ``rule`` "glip": the official GLIP rule (``glip.preprocess.resized_size``: shorter side to
    ``min_size`` unless the longer side would pass ``max_size``), exactly as ``prepare_image``;
    "detr": the same bounds by transformers' rule (``detr_resized_size``, Grounding DINO's image
    processor); "longer": the longer side to ``max_size`` (OWLv2, whose processor then pads the image
    to a ``max_size`` square, bottom/right). Bilinear (PIL's, antialiased when shrinking); the output
    stays ``uint8`` ``[h, w, 3]`` RGB (4x smaller than float32 on its way to the model, which divides
    by 255 as its preprocessing does).
    """
    min_size: int
    max_size: int
    rule: str = "glip"

    def __post_init__(self) -> None:
        if self.rule not in RESIZE_RULES:
            raise ValueError(f"resize rule must be one of {RESIZE_RULES}, got {self.rule!r}")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(new_width, new_height)`` for a ``width`` x ``height`` image."""
        if self.rule == "detr":
            return detr_resized_size(width, height, self.min_size, self.max_size)
        if self.rule == "longer":
            return longer_side_size(width, height, self.max_size)
        from glip.preprocess import resized_size

        return resized_size(width, height, self.min_size, self.max_size)

    def to_dict(self) -> dict[str, Any]:
        return {"min_size": self.min_size, "max_size": self.max_size, "rule": self.rule}

    def __call__(self, image: Image.Image) -> np.ndarray:
        size = self.target_size(image.width, image.height)
        image = image.convert("RGB")
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def teacher_resize(path: str | Path, image_size: int | None = None) -> TeacherResize:
    """The resize for the teacher at ``path`` (read from its config, no weights loaded).

    ``image_size`` overrides the shorter side; the longer-side cap scales with it so the
    checkpoint's aspect-ratio limit is kept (800/1333 -> 400/666). For a transformers model the
    sizes come from its image processor (``labeling.hf_teacher.hf_resize``; OWLv2: ``image_size``
    is the square side).
    """
    from storage import fs

    from labeling.hf_teacher import hf_model_type, hf_resize, is_hub_id

    p = normalize_teacher(path)
    if is_hub_id(p) or (fs.is_dir(p) and fs.is_file(fs.join(p, "config.json")) and hf_model_type(p)):
        return hf_resize(p, image_size)
    if fs.is_dir(p):
        config = fs.join(p, "config.json")
        try:
            cfg = fs.read_json(config)
            min_size, max_size = int(cfg["min_size"]), int(cfg["max_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{config}: unreadable teacher config ({exc})") from exc
    else:
        min_size, max_size = OFFICIAL_MIN_SIZE, OFFICIAL_MAX_SIZE
    if image_size is not None:
        if image_size < 16:
            raise InputError(f"--image-size {image_size}: must be at least 16 pixels")
        max_size = max(image_size, int(round(image_size * max_size / min_size)))
        min_size = image_size
    return TeacherResize(min_size, max_size)


# ----------------------------------------------------------------------------- teachers
class TeacherDeviceError(RuntimeError):
    """The accelerator failed (CUDA error, device-side assert, out of GPU memory) or is missing: not the
    record's fault. The caller restarts the worker (a poisoned CUDA context stays poisoned) rather than
    recording per-image skips."""


class Teacher(Protocol):
    """Grounds phrases of captions in images (see the module docstring for shapes).

    A label is a function of (image, caption, teacher, options) alone: ``ground`` returns the same
    detections for an image whatever else is in the call. ``bucket_of`` names the images that run
    together in one forward pass; a caller that wants full batches accumulates images per bucket.
    ``precision`` ("fp32" | "bf16") is recorded with the labels it made.
    """

    identity: TeacherIdentity
    precision: str

    def bucket_of(self, image: np.ndarray) -> tuple:
        """The batching bucket of a resized ``uint8 [h, w, 3]`` array (hashable, comparable)."""
        ...

    def ground(self, images: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]],
               captions: Sequence[str], phrase_spans: Sequence[PhraseSpans], *,
               threshold: float, nms_iou: float,
               max_per_phrase: int | None = None) -> list[list[list[Detection]]]:
        """``images``: resized ``uint8 [h, w, 3]`` arrays; ``image_sizes``: original (width, height).
        Every box scoring >= ``threshold`` after per-phrase NMS at ``nms_iou`` (at most ``max_per_phrase``
        per phrase), in the caller's order. Raises ``TeacherDeviceError`` when the accelerator fails."""
        ...


def load_teacher(path: str | Path, identity: TeacherIdentity | None = None, device: str = "cpu",
                 precision: str = "fp32") -> Teacher:
    """The ``Teacher`` for ``path`` on ``device``: ``HFTeacher`` for a transformers model (folder or hub id,
    loaded at ``identity.revision``), else ``GLIPTeacher``. A URI is copied to the local cache first
    (``fs.local_copy``, once per machine); ``TeacherDeviceError`` before anything is read when ``device`` is a
    CUDA device torch cannot use."""
    from storage import fs

    check_device(device)
    path = normalize_teacher(path)
    identity = identity or teacher_identity(path)
    if identity.kind == HF_KIND:
        from labeling.hf_teacher import HFTeacher, is_hub_id

        local = path if is_hub_id(path) else fs.local_copy(path)
        return HFTeacher.load(local, identity, device=device, precision=precision)
    return GLIPTeacher.load(fs.local_copy(path), identity, device=device, precision=precision)


def load_glip_model(path: str | Path):
    """Load a GLIP model (eval mode, CPU) from a glipctl checkpoint dir or an official .pth."""
    import glip

    loader = getattr(glip, "load_teacher", None)
    if loader is not None:
        return loader(str(path))
    p = Path(path)
    if p.is_dir():
        return glip.GLIP.from_pretrained(str(p))
    from glip.convert import load_official
    model, _report = load_official(p)
    return model


PRECISIONS = ("fp32", "bf16")
# Substrings of torch's messages for a failing accelerator (lower case): CUDA runtime errors, a device-side
# assert (which poisons the context), cuDNN/cuBLAS failures and the caching allocator's "out of memory".
_DEVICE_ERROR_MARKERS = ("cuda", "device-side assert", "out of memory", "cudnn", "cublas", "nccl")


def is_device_error(exc: BaseException, device: str) -> bool:
    """Whether ``exc``, raised by torch while running on ``device``, is the accelerator's failure: only on a
    ``cuda`` device, a ``torch.cuda.OutOfMemoryError``, a ``torch.AcceleratorError``, or a ``RuntimeError``
    whose message names CUDA, a device-side assert, out of memory, cuDNN, cuBLAS or NCCL."""
    if not str(device).startswith("cuda") or not isinstance(exc, RuntimeError):
        return False
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)      # torch >= 2.8: CUDA runtime errors
    if isinstance(exc, torch.cuda.OutOfMemoryError) or (accelerator_error and isinstance(exc, accelerator_error)):
        return True
    message = str(exc).lower()
    return any(marker in message for marker in _DEVICE_ERROR_MARKERS)


def check_device(device: str) -> None:
    """``TeacherDeviceError`` unless torch can run on ``device`` ("cpu", "cuda", "cuda:N")."""
    import os

    import torch

    kind = torch.device(device)
    if kind.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise TeacherDeviceError(f"teacher device {device!r} requested but CUDA is not available to torch "
                                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}; "
                                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if kind.index is not None and kind.index >= torch.cuda.device_count():
        raise TeacherDeviceError(f"teacher device {device!r} requested but only "
                                 f"{torch.cuda.device_count()} CUDA device(s) are visible")


def check_ground_args(images, image_sizes, captions, phrase_spans) -> None:
    """``ValueError`` unless ``Teacher.ground``'s four per-image lists have one entry per image."""
    if not len(images) == len(image_sizes) == len(captions) == len(phrase_spans):
        raise ValueError(f"{len(images)} images, {len(image_sizes)} sizes, {len(captions)} captions and "
                         f"{len(phrase_spans)} phrase lists")


def as_detections(per_image) -> list[list[Detection]]:
    """One image's per-phrase detections as plain floats (what the ``Teacher`` protocol returns)."""
    return [[{"bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])} for d in dets] for dets in per_image]


class device_errors:
    """Around a teacher's forward: an accelerator failure on ``device`` becomes ``TeacherDeviceError``."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, RuntimeError) and is_device_error(exc, self.device):
            raise TeacherDeviceError(f"teacher on {self.device}: {type(exc).__name__}: {exc}") from exc
        return False


class GLIPTeacher:
    """``Teacher`` backed by ``glip.GLIP.ground``; the model is loaded once, at construction.

    Batch independence: ``GLIP`` zero-pads a batch to its largest image and the padding changes the
    features, so ``ground`` runs one forward pass per bucket, the images whose own ``padded_shape``
    (size rounded up to ``size_divisibility``, what a batch of one gets) is the same, and puts the
    results back in the caller's order. A label then equals the label of that image alone (up to
    float noise of the batch size, ~1e-6). ``bucket_of(array)`` is that ``(H, W)``: a caller that
    accumulates images per bucket gets full forward passes; a call with many buckets is correct,
    only slower.

    ``precision``: "fp32", or "bf16" (the forward under ``torch.autocast(device type, bfloat16)``;
    post-processing and the returned floats stay float32).
    """

    def __init__(self, model, identity: TeacherIdentity, device: str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_device(device)
        self.model = model.to(device).eval()
        self.identity = identity
        self.device = device
        self.precision = precision
        self.size_divisibility = int(model.config.size_divisibility)

    @classmethod
    def load(cls, path: str | Path, identity: TeacherIdentity | None = None,
             device: str = "cpu", precision: str = "fp32") -> "GLIPTeacher":
        """Load the teacher at ``path`` onto ``device``; ``TeacherDeviceError`` before anything is read when
        ``device`` is a CUDA device torch cannot use."""
        check_device(device)
        identity = identity or teacher_identity(path)
        return cls(load_glip_model(path), identity, device, precision)

    def bucket_of(self, image: np.ndarray) -> tuple[int, int]:
        """``(H, W)``: the padded input shape of a resized ``uint8 [h, w, 3]`` array; images of one bucket
        run in one forward pass."""
        from glip.preprocess import padded_shape

        return padded_shape(image.shape[0], image.shape[1], self.size_divisibility)

    def ground(self, images: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]],
               captions: Sequence[str], phrase_spans: Sequence[PhraseSpans], *,
               threshold: float, nms_iou: float,
               max_per_phrase: int | None = None) -> list[list[list[Detection]]]:
        import torch

        check_ground_args(images, image_sizes, captions, phrase_spans)
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, array in enumerate(images):
            buckets.setdefault(self.bucket_of(array), []).append(i)
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        out: list[list[list[Detection]] | None] = [None] * len(images)
        with device_errors(self.device):
            for indices in buckets.values():
                # arrays from a Ray batch are read-only views: copy those (torch wants writable memory)
                tensors = [torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device)
                           .permute(2, 0, 1).float().div_(255.0) for a in (images[i] for i in indices)]
                with torch.inference_mode():
                    found = self.model.ground(
                        tensors, [captions[i] for i in indices],
                        [[(int(s), int(e)) for s, e in phrase_spans[i]] for i in indices],
                        threshold=threshold, nms_threshold=nms_iou, max_per_phrase=max_per_phrase,
                        image_sizes=[tuple(image_sizes[i]) for i in indices], autocast_dtype=autocast)
                for i, per_image in zip(indices, found):
                    out[i] = as_detections(per_image)
        return out
