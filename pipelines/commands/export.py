"""`glipctl export`: pseudo-label and packed shards -> ODVG JSONL or COCO detection JSON (+ the images).

Every path (the shards, ``--out``, ``--images``) is a local path or a URI (``s3://``, ``gs://``,
``file://``; storage.fs).
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def main(
    paths: Annotated[list[str], typer.Argument(
        help="Grounded-sample shards: output folders of pseudo-label or pack (the shards their "
             "manifests commit) or .tar files; local paths or URIs.", show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", help="'odvg': ODVG grounding JSONL (MM-Grounding-DINO / Open-GroundingDino: filename, "
                         "height, width, grounding {caption, regions [{bbox x1y1x2y2 px, phrase, "
                         "tokens_positive}]}, plus key, source and phrases, which those readers ignore); "
                         "'coco': COCO detection JSON.", show_default=False)],
    out: Annotated[str, typer.Option(
        "--out", help="The output file (.jsonl for odvg, .json for coco), local path or URI; written "
                      "once every image is: complete or absent.", show_default=False)],
    images: Annotated[Optional[str], typer.Option(
        "--images", help="Also write each exported sample's image, its original bytes from the tar (never "
                         "re-encoded), into this folder (local path or URI) under the file name its line "
                         "names: the image's member name in its tar, <key made file-safe>.<jpg|png|webp>. "
                         "Without it no image is written and the names are those `tar -xf` of the shards "
                         "into one folder gives.")] = None,
    where: Annotated[Optional[str], typer.Option(
        "--where", help="Export only boxes matching this filter, exactly as `glipctl inspect --where`, e.g. "
                        "\"score >= 0.5 and phrase contains 'dog'\" (columns key, phrase, source, file, score, "
                        "box_index, x, y, w, h, area); samples left without a box are skipped.")] = None,
    categories: Annotated[Optional[str], typer.Option(
        "--categories", help="COCO only: the categories, comma-separated (ids 1..N in this order); a box "
                             "belongs to the one its phrase's root noun names or, else, the longest one "
                             "its phrase ends with ('traffic light'); other boxes are dropped and counted. "
                             "Default: one category per phrase root noun (the parsed root, else the "
                             "phrase's last word; a detection sample's whole category name), sorted.")] = None,
    keep_empty: Annotated[bool, typer.Option(
        "--keep-empty", help="Also write samples without a box (after --where / --categories), as "
                             "negatives; by default they are skipped and counted.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skipped record.")] = False,
) -> None:
    """Export grounded-sample shards (pseudo-labels, packed gold and detection data) to ODVG JSONL or COCO detection JSON, with their images.

    One streaming pass over the shards' sample JSON in shard order; --where keeps the boxes inspect would match; --images writes the original image bytes beside. Read back with `glipctl pack --odvg OUT.jsonl=IMAGES`, `glipctl inspect OUT.jsonl`, or pycocotools.

    Exit 2 on bad input (a missing path, a file that is not a shard) and when no sample is left to export (then nothing is written); a truncated tar or a bad record is a counted skip.
    """
    from pipelines.common import console, setup_logging
    from pipelines.export import ExportOptions, parse_categories, run_export

    setup_logging(verbose)
    options = ExportOptions(format=fmt, out=out, images=images, where=where,
                            categories=parse_categories(categories), keep_empty=keep_empty)
    with _progress(console) as update:
        result = run_export(paths, options, on_progress=update)
    if as_json:
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_summary(console, result)
    if result.images is None:
        console.print("images were not written (--images DIR writes them); the file names are the images' "
                      "names in their tars, as `tar -xf` of the shards into one folder gives them")


def _progress(console):
    """A rich progress bar over shards that also shows samples read and written."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        progress = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("shards  {task.fields[read]:,} read  {task.fields[written]:,} written"),
                            TimeElapsedColumn(), console=console, transient=False, refresh_per_second=2)
        task = progress.add_task("export", total=None, read=0, written=0)
        with progress:
            def update(done: int, total: int, read: int, written: int) -> None:
                progress.update(task, completed=done, total=total, read=read, written=written)
            yield update
    return bar()


def _print_summary(console, result) -> None:
    from rich.table import Table

    d = result.to_dict()
    table = Table(title=f"export ({result.format})", show_header=True)
    for column, justify in (("", "left"), ("read", "right"), ("written", "right"), ("skipped", "right")):
        table.add_column(column, justify=justify)
    samples, boxes = d["samples"], d["boxes"]
    table.add_row("samples", f"{samples['read']:,}", f"{samples['written']:,}",
                  f"{sum(samples['skipped'].values()):,}")
    for reason, n in samples["skipped"].items():
        table.add_row(f"  {reason}", "", "", f"{n:,}")
    table.add_row("boxes", f"{boxes['read']:,}", f"{boxes['written']:,}", f"{sum(boxes['dropped'].values()):,}")
    for reason, n in boxes["dropped"].items():
        table.add_row(f"  {reason}", "", "", f"{n:,}")
    console.print(table)
    console.print(f"wrote {result.out} ({samples['written']:,} samples from {result.shards} shards"
                  + (f", {len(result.categories)} categories)" if result.format == "coco" else ")"))
    if result.images is not None:
        console.print(f"wrote {result.images_written:,} images to {result.images}")
    if result.renamed:
        console.print(f"{result.renamed:,} image names shared by two tars got a _N suffix")
