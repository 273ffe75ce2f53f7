"""`glipctl pack`: gold grounding, COCO detection and ODVG data -> grounded-sample shards for training.

Every path (annotation files, image folders, ``--label-map``, ``--out``) is a local path or a URI
(``s3://``, ``gs://``, ``file://``; storage.fs); local paths are made absolute before they reach Ray.
"""
from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer


def main(
    out: Annotated[str, typer.Option("--out", help="Output folder, local path or URI: per shard "
                                     "<shard>-00000.tar (original image bytes + sample JSON) and "
                                     "<shard>-00000.labels.parquet, _vocabulary/<dataset>.json per "
                                     "detection dataset, _shards/<shard>.json commit records and "
                                     "_manifest.json. train-student reads it as --gold/--detection.")],
    gold: Annotated[Optional[list[str]], typer.Option(
        "--gold", help="MDETR/GoldG grounding data as ANN.json=IMAGE_DIR (repeatable): one grounding "
                       "sample per image entry, as train-student reads it.")] = None,
    detection: Annotated[Optional[list[str]], typer.Option(
        "--detection", help="COCO-style detection data as ANN.json=IMAGE_DIR (repeatable): one sample "
                            "per image with its boxes by category name; the dataset's vocabulary is "
                            "stored once, so training draws a new prompt at every visit.")] = None,
    odvg: Annotated[Optional[list[str]], typer.Option(
        "--odvg", help="ODVG JSONL as FILE.jsonl=IMAGE_DIR (repeatable); grounding lines become "
                       "grounding samples, detection lines detection samples (a file may mix both: "
                       "shards <dataset>-gNNNNN and <dataset>-dNNNNN).")] = None,
    label_map: Annotated[Optional[str], typer.Option(
        "--label-map", help="ODVG label map {\"label\": \"name\"} (JSON) for the detection lines of every "
                            "--odvg file; default: the instances' 'category' fields.")] = None,
    samples_per_shard: Annotated[int, typer.Option(
        min=1, help="Records per shard (one tar each); shard i of a dataset holds its records "
                    "i*N ... (i+1)*N-1 in file order. Changing it needs --overwrite.")] = 1000,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Most packing actors at once (the pool scales between 1 and this); each packs "
                    "whole shards. Default: the Ray cluster's CPU count.")] = None,
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over (delete the shards, commit records and vocabularies of the "
                            "earlier pack) instead of resuming from --out's manifest; needed when "
                            "the datasets or --samples-per-shard change.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skip reason.")] = False,
) -> None:
    """Pack gold grounding (MDETR), COCO detection and ODVG data into grounded-sample shards on Ray.

    Each dataset (one --gold/--detection/--odvg value, named after its annotation file) is cut into shards of --samples-per-shard records; Ray actors read the images, check them (missing, corrupt, or not the annotated size: counted skips) and write the shards and their commit records straight to --out (local or object storage). A re-run resumes from the committed shards.

    Exit 1 when a shard failed (error in the manifest, the others written); exit 2 on bad input.
    """
    from pipelines.common import console, ensure_ray, setup_logging
    from pipelines.pack import PackOptions, PackSpec, check_pack, run_pack
    from storage import fs
    from storage.errors import InputError

    setup_logging(verbose)
    if not verbose:   # Ray Data's own execution chatter; our progress bar and summary replace it
        import ray.data  # noqa: F401  (importing it configures its loggers; override after)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    if label_map is not None and not odvg:
        raise InputError("--label-map applies to --odvg files; none given")
    specs = ([PackSpec.parse("gold", v) for v in gold or []]
             + [PackSpec.parse("detection", v) for v in detection or []]
             + [PackSpec.parse("odvg", v, label_map) for v in odvg or []])
    options = PackOptions(samples_per_shard=samples_per_shard, workers=workers, overwrite=overwrite)
    out = fs.normalize(out)
    datasets = check_pack(specs, out, options)     # bad paths and an --out that cannot resume: before Ray
    ensure_ray(address)
    with _progress(console) as update:
        result = run_pack(specs, out, options, on_progress=update)
    _print_summary(console, result, datasets)
    if result.failed:
        raise typer.Exit(code=1)


def _progress(console):
    """A rich progress bar over shards that also shows images written and images/s."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        progress = Progress(TextColumn("pack"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("shards  {task.fields[images]:,} images  {task.fields[rate]:,.0f} images/s"),
                            TimeElapsedColumn(), console=console, transient=False, refresh_per_second=2)
        task = progress.add_task("pack", total=None, images=0, rate=0.0)
        with progress:
            def update(images: int, finished: int, total: int) -> None:
                elapsed = progress.tasks[0].elapsed or 1e-9
                progress.update(task, completed=finished, total=total, images=images, rate=images / elapsed)
            yield update
    return bar()


def _print_summary(console, result, datasets) -> None:
    from rich.table import Table

    table = Table(title="pack", show_header=True)
    for column, justify in (("dataset", "left"), ("shards", "right"), ("read", "right"),
                            ("written", "right"), ("skipped", "right")):
        table.add_column(column, justify=justify)
    failed, resumed = set(result.failed), set(result.resumed)
    for d in datasets:
        names = result.shards.get(d.name, [])
        counts = result.counts.get(d.name)
        if counts is None:
            continue
        n_failed = sum(n in failed for n in names)
        shards = f"{len(names)} ({sum(n in resumed for n in names)} already done" + \
            (f", {n_failed} failed)" if n_failed else ")")
        table.add_row(f"{d.name} ({d.option})", shards, f"{counts.read:,}", f"{counts.written:,}",
                      f"{sum(counts.skipped.values()):,}")
        for reason, n in sorted(counts.skipped.items()):
            table.add_row(f"  {reason}", "", "", "", f"{n:,}")
    console.print(table)
    line = f"shards: {len(result.done)} packed, {len(result.resumed)} already done, {len(result.failed)} failed"
    if result.seconds > 0 and result.images:
        line += (f"; {result.images:,} images in {result.seconds:,.1f} s "
                 f"({result.images / result.seconds:,.0f} images/s)")
    console.print(line)
    for name in result.failed:
        console.print(f"[red]failed shard {name}:[/] {result.manifest.shards[name].get('error')}")
