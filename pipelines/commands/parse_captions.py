"""`glipctl parse-captions`: crawled captions -> noun-phrase Parquet files (stage 1 of the loop).

Every path (inputs, ``--out``, a ``--spacy-model`` folder) is a local path or a URI (``s3://``,
``gs://``, ``file://``; storage.fs); local paths are made absolute before they reach Ray.
"""
from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from labeling.phrases import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_SPACY_MODEL


def main(
    inputs: Annotated[list[str], typer.Argument(
        help="img2dataset output folders (webdataset or parquet mode; its Parquet sidecar is read "
             "instead of the tar when present), Parquet or JSONL files, or folders of them; local "
             "paths or URIs (s3://, gs://, file://).", show_default=False)],
    out: Annotated[str, typer.Option("--out", help="Output folder, local path or URI: one Parquet "
                                     "phrase file per input shard, _shards/ (one commit record per "
                                     "finished shard) and _manifest.json.")],
    spacy_model: Annotated[str, typer.Option(help="Installed spaCy pipeline name, or a pipeline "
                                             "folder (local path or URI, copied once to each machine; "
                                             "nothing is downloaded from the internet).")] = DEFAULT_SPACY_MODEL,
    caption_field: Annotated[str, typer.Option(help="Caption column / JSON field of Parquet, "
                                               "JSONL and img2dataset .json inputs.")] = "caption",
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Most spaCy actors at once (the pool scales between 1 and this); "
                    "default: the Ray cluster's CPU count.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Captions per nlp.pipe call (each actor "
                                            "parses a whole input shard, in batches of this many).")] = 1000,
    expressions: Annotated[bool, typer.Option(
        "--expressions", help="Grow each noun chunk to its referring expression "
                              "(\"a woman in a red dress\"), as Kosmos-2's GRIT does.")] = False,
    max_caption_chars: Annotated[int, typer.Option(
        min=16, help="Captions longer than this are cut at a word boundary (counted as "
                     "'truncated').")] = DEFAULT_MAX_CAPTION_CHARS,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over (delete the outputs and commit records of the earlier run) "
                            "instead of resuming from --out's manifest.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skip reason.")] = False,
) -> None:
    """Extract groundable noun phrases (exact character spans) from crawled captions with spaCy on Ray.

    Ray actors parse whole input shards and write their phrase files and commit records straight to --out (local or object storage); a re-run resumes from the committed shards.

    Exit 1 when a shard failed (error in the manifest, the others written); exit 2 on bad input.
    """
    from pipelines.common import console, ensure_ray, setup_logging
    from pipelines.parse_captions import (ParseOptions, open_manifest, resolve_options,
                                          run_parse_captions)
    from storage import fs
    from storage.crawled import discover_crawled_shards
    from storage.errors import InputError

    setup_logging(verbose)
    if not verbose:   # Ray Data's own execution chatter; our progress bar and summary replace it
        import ray.data  # noqa: F401  (importing it configures its loggers; override after)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    shards = discover_crawled_shards(inputs, caption_field=caption_field)
    options = ParseOptions(spacy_model=spacy_model, caption_field=caption_field,
                           expressions=expressions, max_caption_chars=max_caption_chars,
                           workers=workers, batch_size=batch_size, overwrite=overwrite)
    out = fs.normalize(out)
    # an unknown model or an --out that cannot be resumed is exit 2 before Ray starts
    options, model = resolve_options(options)
    try:
        open_manifest(out, options, model)
    except OSError as exc:      # bad credentials, unknown bucket, unreachable endpoint
        raise InputError(f"--out {out}: cannot be read ({exc})") from None
    ensure_ray(address)
    with _progress(console) as update:
        result = run_parse_captions(shards, out, options, on_progress=update,
                                    inputs=[fs.normalize(i) for i in inputs])
    _print_summary(console, result, len(shards))
    if result.failed:
        raise typer.Exit(code=1)


def _progress(console):
    """A rich progress bar over shards that also shows captions and captions/s."""
    import contextlib

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    @contextlib.contextmanager
    def bar():
        progress = Progress(TextColumn("parse-captions"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("shards  {task.fields[captions]:,} captions  "
                                       "{task.fields[rate]:,.0f} captions/s"),
                            TimeElapsedColumn(), console=console, transient=False,
                            refresh_per_second=2)
        task = progress.add_task("parse", total=None, captions=0, rate=0.0)
        with progress:
            def update(captions: int, finished: int, total: int) -> None:
                elapsed = progress.tasks[0].elapsed or 1e-9
                progress.update(task, completed=finished, total=total, captions=captions,
                                rate=captions / elapsed)
            yield update
    return bar()


def _print_summary(console, result, n_shards: int) -> None:
    from rich.table import Table

    totals = result.manifest.totals()
    table = Table(title="parse-captions", show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("shards", f"{n_shards} ({len(result.done)} parsed, {len(result.resumed)} already "
                            f"done, {len(result.failed)} failed)")
    table.add_row("captions read", f"{totals['read']:,}")
    table.add_row("captions written", f"{totals['written']:,}")
    table.add_row("phrases written", f"{totals['phrases']:,}")
    for reason, n in totals["skipped"].items():
        table.add_row(f"skipped: {reason}", f"{n:,}")
    for fix, n in totals["cleaned"].items():
        table.add_row(f"cleaned: {fix}", f"{n:,}")
    if result.seconds > 0 and result.captions:
        table.add_row("captions/s (this run)", f"{result.captions / result.seconds:,.0f}")
    console.print(table)
    for name in result.failed:
        console.print(f"[red]failed shard {name}:[/] {result.manifest.shards[name].get('error')}")
