"""``_manifest.json``: what makes every stage resumable (DESIGN.md).

It records the glipctl version, the exact options, the model identity and, per
input shard, a status ("done" or "failed"), output files and counts. A re-run
skips shards marked done and redoes the rest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.atomic import write_json_atomic
from storage.errors import InputError

MANIFEST_NAME = "_manifest.json"


def glipctl_version() -> str:
    try:
        from importlib.metadata import version
        return version("glipctl")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


@dataclass
class Manifest:
    stage: str
    options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: str = field(default_factory=glipctl_version)

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest | None":
        """The manifest in ``out_dir``, or None when absent. Raises ValueError when unreadable."""
        path = Path(out_dir) / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(stage=d["stage"], options=d.get("options", {}), model=d.get("model", {}),
                       shards=d.get("shards", {}), version=d.get("version", "?"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable manifest ({exc}); use --overwrite to start over") from exc

    @classmethod
    def resumable(cls, out_dir: str | Path, stage: str, options: dict[str, Any],
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

    def save(self, out_dir: str | Path) -> None:
        write_json_atomic(Path(out_dir) / MANIFEST_NAME, {
            "stage": self.stage, "version": self.version, "options": self.options,
            "model": self.model, "shards": self.shards, "totals": self.totals(),
        })

    def is_done(self, shard: str) -> bool:
        return self.shards.get(shard, {}).get("status") == "done"

    def mark(self, shard: str, status: str, counts: dict | None = None,
             outputs: list[str] | None = None, error: str | None = None) -> None:
        entry: dict[str, Any] = {"status": status}
        if counts is not None:
            entry["counts"] = counts
        if outputs is not None:
            entry["outputs"] = outputs
        if error is not None:
            entry["error"] = error
        self.shards[shard] = entry

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
