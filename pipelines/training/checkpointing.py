"""Checkpoints of a training run, written by rank 0 straight into the output folder.

Layout of ``--out``::

    checkpoints/step-00000500/   save_pretrained layout + train_state.pt (last ``keep`` kept)
    config.json, model.safetensors, tokenizer/, train_state.pt      the final checkpoint
    metrics.jsonl, _manifest.json

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed when complete, so a
folder named ``step-N`` is always whole; resume reads the newest one. The final checkpoint
is published at the top of ``--out`` (file by file, each atomically, by hard links when the
file system allows) so ``GLIP.from_pretrained(out)`` works.

Why not Ray Train's checkpoint machinery (``ray.train.report(checkpoint=...)`` into
``RunConfig.storage_path``): it would copy every checkpoint from a worker's temp folder
into its own ``<storage>/<run>/checkpoint_<n>`` layout, which we then must copy again to give
``from_pretrained`` its folder at the top of ``--out``. Rank 0 writing directly is one copy,
the same code on a laptop and on a cluster, and needs what Ray Train needs anyway for
multi-node runs: ``--out`` on storage the driver and the workers share.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from storage.atomic import atomic_write

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out`` as (step, folder), oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / TRAIN_STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(out: str | Path, step: int, save_model: Callable[[Path], None],
                    train_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``.

    ``save_model(folder)`` writes the model (``model.save_pretrained``); ``train_state`` is
    saved beside it as ``train_state.pt``.
    """
    import torch

    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)          # left by a crash mid-write
    tmp.mkdir(parents=True)
    save_model(tmp)
    with atomic_write(tmp / TRAIN_STATE) as fh:
        torch.save(train_state, fh)
    _replace_dir(tmp, final)        # the same step written again (a resumed run) is replaced
    prune_checkpoints(out, keep)
    return final


def prune_checkpoints(out: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns what was deleted."""
    found = list_checkpoints(out)
    doomed = [path for _, path in found[:-keep]] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _replace_dir(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``, moving an existing one aside first
    (a folder cannot be renamed over a non-empty one)."""
    if target.exists():
        old = target.parent / f".old-{target.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(checkpoint: str | Path, out: str | Path) -> None:
    """Make ``out`` itself hold ``checkpoint``'s files (``from_pretrained(out)`` layout).

    Each top-level file is replaced atomically; a sub-folder (``tokenizer/``) is built
    beside its target and swapped in. ``train_state.pt`` goes last: a crash mid-publish
    leaves the previous train state, and resume reads ``checkpoints/`` anyway.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    entries = sorted(checkpoint.iterdir(), key=lambda p: p.name == TRAIN_STATE)
    for entry in entries:
        target = out / entry.name
        if entry.is_dir():
            staging = out / f".tmp-{entry.name}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(entry, staging, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)))
            _replace_dir(staging, target)
        else:
            staging = out / f".tmp-{entry.name}"
            staging.unlink(missing_ok=True)
            _link_or_copy(entry, staging)
            os.replace(staging, target)


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``train_state.pt`` of a checkpoint folder (written by this module)."""
    import torch

    # Our own file: it holds numpy generator states and Python RNG tuples besides tensors.
    return torch.load(Path(checkpoint) / TRAIN_STATE, map_location="cpu", weights_only=False)
