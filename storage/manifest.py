"""Manifests: what makes every stage resumable, and the commit point of every shard (DESIGN.md).

An output folder (local or a URI) holds::

    _manifest.json        the readable summary: glipctl version, exact options, model identity,
                          per input shard a status ("done" or "failed"), outputs, counts; totals
    _shards/<name>.json   one small object per finished input shard, written by the worker that
                          finished it, after every output object it names: the commit point

Object stores have no atomic rename, so an output object written under its final name is only
part of the output once its shard's commit record exists. Readers (resume, train-student,
inspect) take the outputs named by committed entries, never a listing of the folder: an object
left by a worker that died mid-shard is ignored, and the retry writes it again under the same
name. The summary is rewritten by the driver from time to time; a commit record newer than the
summary (the driver died in between) is still found, because loading reads the records of every
shard the summary does not already show as done.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from storage import fs
from storage.errors import InputError

log = logging.getLogger("glipctl")

MANIFEST_NAME = "_manifest.json"
COMMITS_DIR = "_shards"
_READ_THREADS = 16       # commit records are tiny objects: read many at once on object stores


def glipctl_version() -> str:
    try:
        from importlib.metadata import version
        return version("glipctl")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def commit_path(out_dir: str, shard: str) -> str:
    return fs.join(out_dir, COMMITS_DIR, f"{shard}.json")


def commit_shard(out_dir: str, shard: str, entry: dict[str, Any]) -> None:
    """Write the commit record of ``shard`` (status "done", its outputs, counts, checksums).

    Call it only after every output object the entry names is completely written.
    """
    fs.write_json(commit_path(out_dir, shard), {"shard": shard, **entry}, indent=None)


def read_commit(out_dir: str, shard: str) -> dict[str, Any] | None:
    """The commit record of ``shard``, or None when it has none (not committed)."""
    try:
        record = fs.read_json(commit_path(out_dir, shard))
    except FileNotFoundError:
        return None
    if not isinstance(record, dict) or record.get("status") != "done":
        return None
    record.pop("shard", None)
    return record


def read_commits(out_dir: str, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Every readable commit record under ``out_dir`` (by shard), leaving out the names in ``skip``.

    One listing, then the records in parallel. A record that cannot be read (cut short by a
    crash locally is impossible, but a foreign file may sit there) is logged and ignored:
    that shard is simply not committed.
    """
    folder = fs.join(out_dir, COMMITS_DIR)
    try:
        entries = fs.list_dir(folder)
    except FileNotFoundError:
        return {}
    wanted = [e for e in entries if not e.is_dir and e.name.endswith(".json")
              and not e.name.startswith(".") and e.name[:-5] not in skip]

    def read(entry: fs.Entry) -> tuple[str, dict | None]:
        try:
            record = fs.read_json(entry.path)
            if not isinstance(record, dict) or record.get("status") != "done":
                raise ValueError("not a commit record")
            return entry.name[:-5], record
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable commit record %s: %s", entry.path, exc)
            return entry.name[:-5], None

    if len(wanted) > 1 and fs.is_remote(out_dir):
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            results = list(pool.map(read, wanted))
    else:
        results = [read(e) for e in wanted]
    out = {}
    for name, record in results:
        if record is not None:
            record.pop("shard", None)
            out[name] = record
    return out


@dataclass
class Manifest:
    stage: str
    options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: str = field(default_factory=glipctl_version)

    @classmethod
    def load(cls, out_dir: str) -> "Manifest | None":
        """The manifest of ``out_dir`` with every committed shard, or None when it has none.

        Raises ValueError when the summary exists but cannot be read.
        """
        path = fs.join(out_dir, MANIFEST_NAME)
        try:
            d = fs.read_json(path)
            manifest = cls(stage=d["stage"], options=d.get("options", {}), model=d.get("model", {}),
                           shards=d.get("shards", {}), version=d.get("version", "?"))
        except FileNotFoundError:
            manifest = None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable manifest ({exc}); use --overwrite to start over") from exc
        done = frozenset(n for n, e in (manifest.shards.items() if manifest else ()) if e.get("status") == "done")
        commits = read_commits(out_dir, skip=done)
        if manifest is None:
            if not commits:
                return None
            manifest = cls(stage=next(iter(commits.values())).get("stage", "?"))
        for name, record in commits.items():
            record.pop("stage", None)
            manifest.shards[name] = record
        return manifest

    @classmethod
    def resumable(cls, out_dir: str, stage: str, options: dict[str, Any],
                  output_keys: "list[str] | tuple[str, ...]") -> "Manifest | None":
        """The manifest of an earlier run of ``stage`` in ``out_dir`` to resume from, or None.

        Raises ``InputError`` when it is unreadable, belongs to another stage, or was written
        with other values of the options that change the output (``output_keys``): resuming
        then would mix two kinds of output in one folder.
        """
        try:
            old = cls.load(out_dir)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if old is None:
            return None
        if old.stage != stage:
            raise InputError(f"{out_dir}: holds the output of `{old.stage}`, not {stage}; "
                             f"choose another --out or pass --overwrite")
        changed = [f"{k}: {old.options.get(k)!r} -> {options.get(k)!r}" for k in output_keys
                   if old.options.get(k) != options.get(k)]
        if changed:
            raise InputError(f"{out_dir}: was written with other options ({', '.join(changed)}); "
                             f"pass --overwrite to start over")
        return old

    def save(self, out_dir: str) -> None:
        """Write the readable summary ``_manifest.json`` (the commit records stay the truth)."""
        fs.write_json(fs.join(out_dir, MANIFEST_NAME), {
            "stage": self.stage, "version": self.version, "options": self.options,
            "model": self.model, "shards": self.shards, "totals": self.totals(),
        })

    def is_done(self, shard: str) -> bool:
        return self.shards.get(shard, {}).get("status") == "done"

    def mark(self, shard: str, status: str, counts: dict | None = None,
             outputs: list[str] | None = None, error: str | None = None, **extra: Any) -> None:
        entry: dict[str, Any] = {"status": status}
        if counts is not None:
            entry["counts"] = counts
        if outputs is not None:
            entry["outputs"] = outputs
        if error is not None:
            entry["error"] = error
        entry.update(extra)
        self.shards[shard] = entry

    def outputs(self) -> list[str]:
        """The output names of every done shard, in shard order (names relative to the folder)."""
        return [o for name in sorted(self.shards) if self.is_done(name)
                for o in self.shards[name].get("outputs") or []]

    def totals(self) -> dict[str, Any]:
        read = written = 0
        skipped: dict[str, int] = {}
        for entry in self.shards.values():
            c = entry.get("counts") or {}
            read += int(c.get("read", 0))
            written += int(c.get("written", 0))
            for k, v in (c.get("skipped") or {}).items():
                skipped[k] = skipped.get(k, 0) + int(v)
        failed = sorted(k for k, e in self.shards.items() if e.get("status") == "failed")
        return {"read": read, "written": written, "skipped": dict(sorted(skipped.items())),
                "failed_shards": failed}


def committed_outputs(folder: str) -> list[str] | None:
    """Full paths of the committed outputs of a stage's output ``folder``, or None without a manifest.

    What every reader of stage output lists instead of the folder (module docstring).
    """
    manifest = Manifest.load(folder)
    if manifest is None:
        return None
    return [fs.join(folder, name) for name in manifest.outputs()]


def clear_shard(out_dir: str, shard: str, outputs: list[str]) -> None:
    """Forget a shard before it is redone: its commit record first, then its outputs."""
    fs.delete(commit_path(out_dir, shard))
    for name in outputs:
        fs.delete(fs.join(out_dir, name))


def dumps_entry(entry: dict[str, Any]) -> str:
    """A manifest entry as the one-line JSON that travels back to the driver in a result row."""
    return json.dumps(entry, separators=(",", ":"), sort_keys=True)
