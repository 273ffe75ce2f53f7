"""Model checkpoint folders on any filesystem: where a model is, and how one is copied safely.

A checkpoint is a folder that ``glip.GLIP.from_pretrained`` loads (``config.json``, the
safetensors weights, ``tokenizer/``); ``config.json`` is written last, so a folder holding it
is complete. A ``train-student`` output folder is such a checkpoint (its final model at the
top) plus the run's own files (``RUN_FILES``: older checkpoints, metrics, manifest, the
resume state), which loading a model never needs.

On object stores nothing can be renamed into place, so the run commits each checkpoint by
writing ``latest.json`` after all of its objects (``write_pointer``): readers that follow the
pointer (``model_folder``) never load a half-uploaded checkpoint. Locally a checkpoint folder
is renamed into place whole and needs no pointer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from storage import fs

CONFIG = "config.json"
POINTER = "latest.json"
# What a training run writes into its output folder besides the model itself.
RUN_FILES = ("checkpoints", "_ray", "metrics.jsonl", "_manifest.json", "_shards", "train_state.pt", POINTER)


def read_pointer(out: str | os.PathLike) -> dict[str, Any] | None:
    """The commit pointer of a run folder on an object store, or None when there is none.

    ``{"step": int, "checkpoint": "checkpoints/step-...", "kept": [[step, "checkpoints/step-..."], ...]}``
    with folder names relative to ``out``, oldest first.
    """
    try:
        pointer = fs.read_json(fs.join(out, POINTER))
    except FileNotFoundError:
        return None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("kept"), list):
        raise ValueError(f"{fs.join(out, POINTER)}: not a checkpoint pointer")
    return pointer


def write_pointer(out: str | os.PathLike, kept: list[tuple[int, str]]) -> None:
    """Commit the checkpoints ``kept`` (``(step, folder relative to out)``, oldest first).

    Call it only once every object of those folders is written: it is their commit point.
    """
    kept = sorted((int(s), str(name)) for s, name in kept)
    newest = kept[-1] if kept else (None, None)
    fs.write_json(fs.join(out, POINTER), {"step": newest[0], "checkpoint": newest[1],
                                          "kept": [list(k) for k in kept]})


def model_folder(path: str | os.PathLike) -> str:
    """The checkpoint a model path names: a run folder's newest committed checkpoint when it
    has a pointer, else ``path`` itself (normalized)."""
    text = fs.normalize(path)
    if not fs.is_remote(text):
        return text
    try:
        pointer = read_pointer(text) if fs.is_dir(text) else None
    except ValueError:
        pointer = None
    if pointer and pointer.get("checkpoint"):
        return fs.join(text, pointer["checkpoint"])
    return text


def local_model(path: str | os.PathLike) -> str:
    """A local path ``from_pretrained`` (or an official ``.pth`` loader) reads the model at ``path`` from.

    Local paths come back as they are. From an object store only what loading needs is
    copied (each file once per machine, ``fs.local_copy``): a run folder's pointer is
    followed and ``RUN_FILES`` (optimizer state, old checkpoints) are left where they are.
    """
    folder = model_folder(path)
    if not fs.is_remote(folder):
        return folder
    if not fs.is_dir(folder):
        return fs.local_copy(folder)          # a file: an official .pth
    parts = {e.name: fs.local_copy(e.path) for e in fs.list_dir(folder)
             if e.name not in RUN_FILES and not e.name.startswith(".")}
    digest = hashlib.sha256(json.dumps([folder, sorted(parts.items())]).encode()).hexdigest()
    target = fs.cache_dir() / "models" / digest[:24]
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    try:
        for name, local in parts.items():
            os.symlink(local, staging / name)
        with contextlib.suppress(OSError):    # another process finished first: keep theirs
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def upload_checkpoint(local: str | os.PathLike, dest: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Copy the local checkpoint folder ``local`` (less the names in ``skip``) to ``dest`` (local path or URI).

    ``dest/config.json`` is removed first and written last, so ``dest`` never looks like a
    complete checkpoint while it holds a mix of two; sub-folders are replaced whole.
    """
    local = Path(local)
    # only what is there: deleting a missing folder on S3 makes pyarrow leave a folder marker behind
    if fs.exists(fs.join(dest, CONFIG)):
        fs.delete(fs.join(dest, CONFIG))
    for child in sorted(local.iterdir(), key=lambda p: (p.name == CONFIG, p.name)):
        if child.name in skip:
            continue
        target = fs.join(dest, child.name)
        if child.is_dir() and fs.exists(target):
            fs.delete_dir(target)
        fs.upload_tree(child, target)
