"""Checkpoints of a training run, written by rank 0 straight into the output folder.

Layout of ``--out``::

    checkpoints/step-00000500/   save_pretrained layout + train_state.pt (last ``keep`` kept)
    config.json, model.safetensors, tokenizer/, train_state.pt      the final checkpoint
    metrics.jsonl, _manifest.json

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed when complete, so a
folder named ``step-N`` is always whole; resume reads the newest one. The final checkpoint
is published at the top of ``--out`` (file by file, each atomically, by hard links when the
file system allows) so ``GLIP.from_pretrained(out)`` works.

``--out`` on an object store (``s3://...``): rank 0 writes each checkpoint into a local
staging folder exactly as above, uploads it to ``OUT/checkpoints/step-N`` and then commits it
by rewriting ``OUT/latest.json`` (``storage.checkpoints``), the only thing readers trust
there: resume and ``list_checkpoints`` follow the pointer, never a listing, so a half-uploaded
checkpoint is never loaded. ``metrics.jsonl`` is kept in the staging folder and uploaded
whole now and then; the final model is uploaded to the top of ``OUT`` with ``config.json``
last. ``RunOutput`` hides which of the two it is from the training loop.

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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from storage import fs
from storage.atomic import atomic_write
from storage.checkpoints import read_pointer, upload_checkpoint, write_pointer

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
_NAME = re.compile(r"^step-(\d+)$")

# A checkpoint's location: a local folder (Path), or a URI string on an object store.
Location = Path | str


def checkpoint_name(step: int) -> str:
    """The folder of checkpoint ``step``, relative to the run's output folder."""
    return f"{CHECKPOINTS}/step-{step:08d}"


def checkpoint_dir(out: str | Path, step: int) -> Location:
    if fs.is_remote(out):
        return fs.join(out, checkpoint_name(step))
    return Path(out) / CHECKPOINTS / f"step-{step:08d}"


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step of a checkpoint folder, from its name (``.../step-00000500`` -> 500)."""
    m = _NAME.match(fs.name_of(checkpoint))
    if not m:
        raise ValueError(f"{checkpoint}: not a checkpoint folder (step-N)")
    return int(m.group(1))


def list_checkpoints(out: str | Path) -> list[tuple[int, Location]]:
    """Complete checkpoints under ``out`` as (step, folder), oldest first.

    Locally the folders themselves (a ``step-N`` folder is renamed into place whole); on an
    object store the ones its pointer commits (URIs).
    """
    if fs.is_remote(out):
        pointer = read_pointer(out)
        return [(int(s), fs.join(out, name)) for s, name in (pointer or {}).get("kept", [])]
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / TRAIN_STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Location | None:
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
    """The ``train_state.pt`` of a checkpoint folder (written by this module; local or a URI)."""
    import torch

    local = Path(fs.local_copy(checkpoint)) if fs.is_remote(checkpoint) else Path(checkpoint)
    # Our own file: it holds numpy generator states and Python RNG tuples besides tensors.
    return torch.load(local / TRAIN_STATE, map_location="cpu", weights_only=False)


def publish_checkpoint(checkpoint: Location, out: str | Path) -> None:
    """``publish`` for any filesystem: the checkpoint's files at the top of ``out``
    (on object stores without ``train_state.pt``: module docstring)."""
    from storage.checkpoints import local_model

    if not fs.is_remote(out):
        publish(checkpoint, out)
        return
    upload_checkpoint(local_model(checkpoint), out, skip=(TRAIN_STATE,))


def clear_run(out: str | Path, names: tuple[str, ...]) -> None:
    """Delete ``names`` (files or folders) from ``out``; object stores: the pointer first, so
    no checkpoint stays committed while its objects go."""
    from storage.checkpoints import POINTER

    ordered = sorted(set(names) | ({POINTER} if fs.is_remote(out) else set()), key=lambda n: n != POINTER)
    for name in ordered:
        path = fs.join(out, name)
        if fs.is_dir(path):
            fs.delete_dir(path)
        else:
            fs.delete(path)


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts/lists/tuples) whose tensors are CPU copies: later
    in-place updates of the originals (an optimizer step) do not reach it."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


def staging_root() -> Path:
    """Local scratch space for runs whose output is on an object store (beside the download cache)."""
    return fs.cache_dir() / "staging"


class RunOutput:
    """Where rank 0 writes checkpoints and metrics of a run with output folder ``out``.

    Locally ``work`` is ``out`` itself. On an object store ``work`` is a local staging folder:
    each checkpoint is saved there, uploaded and committed (module docstring); the staging
    folder holds only the newest checkpoint and is removed by ``close``.
    """

    METRICS_UPLOAD_S = 10.0     # at most one upload of metrics.jsonl per this many seconds (plus checkpoints)

    def __init__(self, out: str | Path):
        self.out = fs.normalize(out)
        self.remote = fs.is_remote(self.out)
        if self.remote:
            staging_root().mkdir(parents=True, exist_ok=True)
            self.work = Path(tempfile.mkdtemp(prefix="train-", dir=staging_root()))
        else:
            self.work = Path(self.out)
            self.work.mkdir(parents=True, exist_ok=True)
        self._metrics_uploaded = 0.0
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None

    def save_checkpoint(self, step: int, save_model: Callable[[Path], None], train_state: dict[str, Any],
                        keep: int) -> Location:
        """Write (and on object stores upload and commit) checkpoint ``step``; keep the newest ``keep``."""
        if not self.remote:
            return save_checkpoint(self.out, step, save_model, train_state, keep)
        local = save_checkpoint(self.work, step, save_model, train_state, keep=1)
        name = checkpoint_name(step)
        committed = [(s, n) for s, n in ((read_pointer(self.out) or {}).get("kept") or [])]
        others = [(s, n) for s, n in committed if n != name]
        if len(others) != len(committed):    # this step is rewritten: uncommit it while its objects change
            write_pointer(self.out, others)
        upload_checkpoint(local, fs.join(self.out, name))
        kept = sorted(others + [(step, name)])[-keep:]
        write_pointer(self.out, kept)
        names = {n for _, n in kept}
        try:
            entries = fs.list_dir(fs.join(self.out, CHECKPOINTS))
        except FileNotFoundError:
            entries = []
        for e in entries:     # older ones, and any a crash left uploaded but never committed
            if e.is_dir and f"{CHECKPOINTS}/{e.name}" not in names:
                fs.delete_dir(e.path)
        self.upload_metrics(force=True)
        return fs.join(self.out, name)

    def save_checkpoint_in_background(self, step: int, model, train_state: dict[str, Any], keep: int) -> None:
        """``save_checkpoint`` from a snapshot, written by a thread while training goes on.

        The snapshot (weights and train state copied to CPU memory) is all the training loop
        waits for; the write, upload and commit happen behind it. One write at a time: a
        checkpoint asked for while the previous one is still being written waits for it.
        ``wait`` re-raises a failed write.
        """
        self.wait()
        weights = snapshot({k: v for k, v in model.state_dict().items()})
        state = snapshot(train_state)

        def write() -> None:
            try:
                self.save_checkpoint(step, lambda folder: model.save_pretrained(folder, state_dict=weights), state, keep)
            except BaseException as exc:    # handed to the training thread by wait()
                self._failure = exc

        self._writer = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        self._writer.start()

    def wait(self) -> None:
        """Block until the background checkpoint write (if any) is done; re-raise its error."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    @property
    def metrics_path(self) -> Path:
        from pipelines.training.loop import METRICS
        return self.work / METRICS

    def upload_metrics(self, force: bool = False) -> None:
        """Object stores: copy the local ``metrics.jsonl`` to ``out`` (whole; no appends there)."""
        if not self.remote or not self.metrics_path.is_file():
            return
        now = time.monotonic()
        if force or now - self._metrics_uploaded >= self.METRICS_UPLOAD_S:
            fs.upload_tree(self.metrics_path, fs.join(self.out, self.metrics_path.name))
            self._metrics_uploaded = now

    def publish_final(self) -> None:
        """The newest checkpoint's files at the top of ``out`` (``from_pretrained(out)``)."""
        self.wait()
        final = latest_checkpoint(self.work)
        if final is None:
            return
        if self.remote:
            upload_checkpoint(final, self.out, skip=(TRAIN_STATE,))
        else:
            publish(final, self.out)

    def close(self) -> None:
        try:
            self.wait()
        except Exception as exc:   # closing after another error: that one is the story
            import logging
            logging.getLogger("glipctl.train").error("checkpoint write failed: %s", exc)
        if self.remote:
            self.upload_metrics(force=True)
            shutil.rmtree(self.work, ignore_errors=True)
