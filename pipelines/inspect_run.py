"""``glipctl inspect`` end to end: one streaming pass over the Arrow view, then output.

One pass reads every source batch by batch (``storage.arrow_view``), applies the
--where predicate to the box view, updates the summary, appends to the --to Parquet
file and picks the samples to render; a second, short pass reads the images of
those samples only. Memory is one batch plus fixed-size summaries.

Every path is a local path or a URI (``storage.fs``): the sources, ``--to`` (written through
``storage.fs.open_output``: complete or absent, never half a file) and ``--render``. A shard
with a label table beside it (pseudo-label writes one per tar) is read from that table, so a
summary, a filter or an export never reads the images; only ``--render`` opens the tars.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipelines.inspect_render import pick_targets, render
from pipelines.inspect_summary import InspectSummary, filter_samples, matched_per_sample
from pipelines.inspect_where import compile_where
from storage import fs
from storage.arrow_view import BOX_SCHEMA, SAMPLE_SCHEMA, explode_boxes, iter_sample_batches, manifest_totals
from storage.skips import StageCounts


@dataclass
class InspectOptions:
    to: str | None = None               # Parquet file, local path or URI
    view: str = "boxes"                 # what --to writes: "boxes" or "samples"
    where: str | None = None
    render: str | None = None           # folder for the PNGs, local path or URI
    limit: int = 20
    top: int = 15
    batch_size: int = 8192


@dataclass
class InspectResult:
    summary: dict[str, Any]
    skipped: dict[str, int]
    read: int
    manifest: dict[str, Any] | None = None
    rendered: list[str] = field(default_factory=list)
    written_rows: int = 0
    to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.summary)
        d["records_read"] = self.read
        d["skipped"] = self.skipped
        if self.manifest is not None:
            d["manifest"] = self.manifest
        if self.to is not None:
            d["to"] = {"path": self.to, "rows": self.written_rows}
        if self.rendered:
            d["rendered"] = self.rendered
        return d


def run_inspect(paths: list[str], options: InspectOptions) -> InspectResult:
    """Summarise ``paths``; write/render what ``options`` asks. InputError for bad paths or --where."""
    import pyarrow.parquet as pq

    predicate = compile_where(options.where) if options.where else None
    counts = StageCounts()
    summary = InspectSummary()
    targets: dict[tuple[str, str], list[int] | None] = {}
    rows = 0
    with contextlib.ExitStack() as stack:
        writer = None
        if options.to is not None:
            sink = stack.enter_context(fs.open_output(options.to))
            schema = BOX_SCHEMA if options.view == "boxes" else SAMPLE_SCHEMA
            writer = stack.enter_context(pq.ParquetWriter(sink, schema, compression="zstd"))
        for samples in iter_sample_batches(paths, counts, options.batch_size):
            boxes = explode_boxes(samples)
            mask = predicate(boxes).to_numpy(zero_copy_only=False) if predicate else None
            summary.update(samples, boxes, mask)
            kept_boxes = boxes if mask is None else boxes.filter(mask)
            if writer is not None:
                out = kept_boxes if options.view == "boxes" else (
                    samples if mask is None else filter_samples(samples, mask))
                if out.num_rows:
                    writer.write_batch(out)
                    rows += out.num_rows
            if options.render is not None and len(targets) < options.limit:
                targets.update(pick_targets(samples, kept_boxes, matched_per_sample(samples, mask),
                                            options.limit - len(targets), predicate is not None))
    rendered: list[str] = []
    if options.render is not None and targets:
        rendered = render(paths, dict(targets), options.render, counts)
    return InspectResult(summary=summary.to_dict(options.top), skipped=dict(sorted(counts.skipped.items())),
                         read=counts.read, manifest=manifest_totals(paths), rendered=rendered,
                         written_rows=rows, to=fs.normalize(options.to) if options.to else None)


def print_summary(result: InspectResult, as_json: bool = False) -> None:
    """Tables on stdout (or the JSON object with ``as_json``)."""
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = result.summary
    head = Table(title="glipctl inspect", show_header=False)
    head.add_row("records read", f"{result.read:,}")
    head.add_row("samples", f"{s['samples']:,}")
    head.add_row("samples with boxes", f"{s['samples_with_boxes']:,}")
    head.add_row("boxes", f"{s['boxes']:,}")
    head.add_row("boxes / sample", f"{s['boxes_per_sample']['mean']:.2f}")
    if s["score"]["mean"] is not None:
        head.add_row("score mean [min, max]",
                     f"{s['score']['mean']:.3f} [{s['score']['min']:.3f}, {s['score']['max']:.3f}]")
    if result.to:
        head.add_row("written", f"{result.written_rows:,} rows -> {result.to}")
    if result.rendered:
        head.add_row("rendered", f"{len(result.rendered)} PNGs in {fs.parent_of(result.rendered[0])}")
    console.print(head)

    def bars(title: str, hist: dict[str, int], label: str) -> None:
        t = Table(title=title)
        t.add_column(label)
        t.add_column("count", justify="right")
        t.add_column("")
        peak = max(hist.values() or [0]) or 1
        for k, n in hist.items():
            t.add_row(k, f"{n:,}", "#" * round(30 * n / peak))
        console.print(t)

    bars("boxes per sample", s["boxes_per_sample"]["histogram"], "boxes")
    if s["boxes"]:
        bars("score histogram", s["score"]["histogram"], "score")
    phrases = Table(title="most frequent phrases" + (" (approximate)" if s["top_phrases_approximate"] else ""))
    phrases.add_column("phrase")
    phrases.add_column("boxes", justify="right")
    for p, n in s["top_phrases"]:
        phrases.add_row(p, f"{n:,}")
    console.print(phrases)
    sources = Table(title="sources")
    for c in ("source", "samples", "boxes"):
        sources.add_column(c, justify="left" if c == "source" else "right")
    for name, v in s["sources"].items():
        sources.add_row(name or "(none)", f"{v['samples']:,}", f"{v['boxes']:,}")
    console.print(sources)
    skipped = Table(title="skipped records (this read)")
    skipped.add_column("reason")
    skipped.add_column("count", justify="right")
    for k, n in result.skipped.items():
        skipped.add_row(k, f"{n:,}")
    if not result.skipped:
        skipped.add_row("(none)", "0")
    console.print(skipped)
    if result.manifest is not None:
        m = result.manifest
        mt = Table(title="skipped when written (_manifest.json)")
        mt.add_column("reason")
        mt.add_column("count", justify="right")
        mt.add_row("read", f"{m['read']:,}")
        mt.add_row("written", f"{m['written']:,}")
        for k, n in m["skipped"].items():
            mt.add_row(k, f"{n:,}")
        if m["failed_shards"]:
            mt.add_row("failed shards", ", ".join(m["failed_shards"]))
        console.print(mt)
