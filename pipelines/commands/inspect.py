"""`glipctl inspect`: summarise, filter, export and draw grounded samples through the Arrow view.

Every path (sources, ``--to``, ``--render``) is a local path or a URI (``s3://``, ``gs://``,
``file://``). Shards with a label table beside them are summarised, filtered and exported from
that table alone; only ``--render`` reads images.
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def main(
    paths: Annotated[list[str], typer.Argument(
        help="Pseudo-label shards (.tar or folders of them: a stage's output folder gives the shards "
             "its manifest commits, read from their label tables when present), MDETR GoldG or COCO "
             ".json, ODVG .jsonl; local paths or URIs (s3://, gs://, file://); write "
             "ANN.json=IMAGE_DIR to give a JSON file its images (needed by --render).",
        show_default=False)],
    to: Annotated[Optional[str], typer.Option(
        "--to", help="Write the (filtered) view to this Parquet file (local path or URI).")] = None,
    view: Annotated[str, typer.Option(
        "--view", help="What --to writes: 'boxes' (one row per box: key, phrase, bbox, score, source) "
                       "or 'samples' (one row per sample, boxes nested).")] = "boxes",
    where: Annotated[Optional[str], typer.Option(
        "--where", help="Keep only boxes matching this filter, e.g. \"score >= 0.6 and phrase contains "
                        "'dog'\". Columns: key, phrase, source, file, score, box_index, x, y, w, h, area; "
                        "operators == != < <= > >= contains in; and/or/not; parentheses.")] = None,
    render: Annotated[Optional[str], typer.Option(
        "--render", help="Draw the first --limit samples' (matching) boxes and phrases onto PNGs "
                         "in this folder (local path or URI; reads the images from the tars).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many samples --render draws.")] = 20,
    top: Annotated[int, typer.Option("--top", min=1, help="How many frequent phrases to list.")] = 15,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON on stdout instead of tables.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skipped record.")] = False,
) -> None:
    """Summarise grounded samples (shards, GoldG, COCO, ODVG): boxes per sample, scores, phrases, sources, skips; filter with --where, export with --to, draw with --render.

    Every path may be a URI (s3://bucket/pseudo/). Shards with a label table beside them (pseudo-label writes one per tar) are summarised, filtered and exported from the tables alone; only --render reads the images.
    """
    from pipelines.common import setup_logging
    from pipelines.inspect_run import InspectOptions, print_summary, run_inspect
    from storage import fs
    from storage.errors import InputError

    setup_logging(verbose)
    if view not in ("boxes", "samples"):
        raise InputError(f"--view must be 'boxes' or 'samples', not {view!r}")
    if to is not None and fs.suffix_of(to) != ".parquet":
        raise InputError(f"--to {to}: the file name must end in .parquet")
    result = run_inspect(paths, InspectOptions(to=to, view=view, where=where, render=render,
                                               limit=limit, top=top))
    print_summary(result, as_json=as_json)
    if result.summary["samples"] == 0 and result.skipped:
        raise InputError(f"no usable sample in {', '.join(paths)} "
                         f"(skipped: {', '.join(f'{k} {v}' for k, v in result.skipped.items())})")

