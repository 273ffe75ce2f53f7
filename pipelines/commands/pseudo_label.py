"""`glipctl pseudo-label`: a teacher (GLIP, Grounding DINO, MM Grounding DINO, OWLv2) grounds parsed phrases;
WebDataset shards with boxes (stage 2)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from labeling.filters import (DEFAULT_MAX_BOXES_PER_PHRASE, DEFAULT_MIN_BOX_SIZE, DEFAULT_NMS_IOU,
                              DEFAULT_THRESHOLD)


def main(
    inputs: Annotated[list[str], typer.Argument(
        help="The crawled images: img2dataset output folders, Parquet or JSONL files (the same "
             "inputs given to parse-captions). Local paths or URIs (s3://, gs://, file://).",
        show_default=False)],
    phrases: Annotated[str, typer.Option("--phrases", help="The --out folder of parse-captions "
                                         "(one <shard>.parquet per input shard); a path or URI.")],
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher checkpoint: a glipctl checkpoint "
                                         "folder, an official GLIP .pth (converted on load), or a "
                                         "transformers zero-shot detector (Grounding DINO, MM Grounding "
                                         "DINO, OWLv2: a folder saved with its processor, recognised by "
                                         "config.json model_type, or a hub id owner/name[@revision]); a "
                                         "path or URI (copied once per node into GLIPCTL_CACHE_DIR).")],
    out: Annotated[str, typer.Option("--out", help="Output folder or URI: <shard>-NNNNN.tar WebDataset "
                                     "shards ({shard}_{key}.jpg + .json), a .labels.parquet table beside "
                                     "each, _shards/<shard>.json commit records and _manifest.json.")],
    threshold: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Keep boxes scoring at least this. Default 0.5: the value the official "
        "GLIP demo notebook passes to GLIPDemo.run_on_web_image (microsoft/GLIP; its GLIPDemo default is "
        "0.7); the paper does not print the one used for its web pseudo-labels.")] = DEFAULT_THRESHOLD,
    nms: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="IoU above which a phrase's lower-scoring box is suppressed "
        "(per phrase; 0.6 is the official MODEL.ATSS.NMS_TH).")] = DEFAULT_NMS_IOU,
    max_boxes_per_phrase: Annotated[int, typer.Option(
        min=1, help="Keep at most this many boxes per phrase (best first).")] = DEFAULT_MAX_BOXES_PER_PHRASE,
    min_box_size: Annotated[float, typer.Option(
        min=0.0, help="Drop boxes whose width or height (after clipping to the image) is under this "
        "many pixels.")] = DEFAULT_MIN_BOX_SIZE,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Most teacher actors at once (the pool starts at this size and shrinks if nodes "
        "are lost); each labels whole input shards. Default: the cluster's GPUs / --gpus-per-worker, "
        "or its CPU count on a CPU cluster (each CPU actor runs one torch thread).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per teacher call (images of one padded "
                                            "shape; a label never depends on its batch).")] = 8,
    gpus_per_worker: Annotated[Optional[float], typer.Option(
        min=0.0, help="GPUs per teacher actor (fractions share a GPU); default 1 when the Ray "
        "cluster has GPUs, else 0 (CPU). An actor given a GPU that finds no CUDA fails the run.")] = None,
    precision: Annotated[str, typer.Option(
        help="fp32, or bf16 (autocast; for GPUs). Recorded in the manifest and every sample; a "
             "resumed run must use the same.")] = "fp32",
    image_size: Annotated[Optional[int], typer.Option(
        min=16, help="Shorter image side fed to the teacher (longer side capped in proportion; OWLv2: the "
        "side of its square input); default: the checkpoint's own (800 for official GLIP and Grounding "
        "DINO, 960 for OWLv2).")] = None,
    max_samples_per_tar: Annotated[int, typer.Option(
        min=1, help="Samples per output tar; an input shard larger than this gets several.")] = 10000,
    caption_field: Annotated[str, typer.Option(
        help="Caption column / JSON field of Parquet, JSONL and img2dataset .json inputs (as given "
             "to parse-captions).")] = "caption",
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "--tuned-prompt", help="A tuned prompt folder (prompt.json + prompt.safetensors from "
        "`glipctl prompt-tune --mode prompt`; a path or URI). Instead of each caption's parsed phrases, the teacher "
        "grounds the prompt's own text in every image, one phrase per category (its span covers the category "
        "name only); each sample's caption is that text, its phrases the categories (root = category name), "
        "and the crawled caption is kept in extra.alt_text. The phrase files still say which images to label. "
        "Only with the GLIP --teacher it was tuned on (refused unless that model's sha256 is the one recorded; "
        "transformers teachers are refused). Its sha256 is recorded: a resumed run must use the same prompt.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(
        "--prompt-template", help="Ground a manual category prompt in every image instead of each caption's "
        "phrases: JSON (a file, a URI or inline) naming the categories and the words around each name, "
        "{\"hand\": {\"suffix\": \" of a person\"}, \"dog\": {}} or the official list [{\"prefix\", "
        "\"name\", \"suffix\"}, ...]; the prompt is 'hand of a person. dog.' and each span covers the name "
        "only. Samples as with --prompt (caption = that prompt, crawled caption in extra.alt_text); any teacher. "
        "With --prompt the prompt's own template is used and a different one here is an error. Recorded: a "
        "resumed run must use the same.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over instead of resuming from --out's _manifest.json.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skip reason.")] = False,
) -> None:
    """Ground the parsed phrases of crawled captions with a teacher on Ray; write WebDataset pseudo-label shards."""
    from labeling.teacher import normalize_teacher
    from pipelines.common import console, ensure_ray, setup_logging
    from pipelines.pseudo_label import PseudoLabelOptions, check_options, run_pseudo_label
    from storage.crawled import discover_crawled_shards

    from storage.fs import normalize

    setup_logging(verbose)
    shards = discover_crawled_shards(inputs, caption_field=caption_field)
    options = PseudoLabelOptions(phrases=normalize(phrases), teacher=normalize_teacher(teacher), threshold=threshold,
                                 nms_iou=nms, max_boxes_per_phrase=max_boxes_per_phrase,
                                 min_box_size=min_box_size, image_size=image_size, workers=workers,
                                 batch_size=batch_size, gpus_per_worker=gpus_per_worker, precision=precision,
                                 max_samples_per_tar=max_samples_per_tar, caption_field=caption_field,
                                 overwrite=overwrite, prompt=normalize(prompt) if prompt else None,
                                 prompt_template=prompt_template)
    check_options(options)          # bad paths are exit 2 before Ray starts
    ensure_ray(address)
    with _progress(console) as update:
        result = run_pseudo_label(shards, normalize(out), options, on_progress=update)
    _print_summary(console, result, len(shards))
    if result.failed:
        raise typer.Exit(code=1)


def _progress(console):
    """A rich progress bar over input shards showing images, boxes, images/s and boxes/s."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        progress = Progress(TextColumn("pseudo-label"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("shards  {task.fields[images]:,} images  {task.fields[boxes]:,} boxes  "
                                       "{task.fields[ips]:,.1f} images/s  {task.fields[bps]:,.1f} boxes/s"),
                            TimeElapsedColumn(), console=console, transient=False)
        task = progress.add_task("pseudo", total=None, images=0, boxes=0, ips=0.0, bps=0.0)
        with progress:
            def update(images: int, boxes: int, finished: int, total: int) -> None:
                elapsed = progress.tasks[0].elapsed or 1e-9
                progress.update(task, completed=finished, total=total, images=images, boxes=boxes,
                                ips=images / elapsed, bps=boxes / elapsed)
            yield update
    return bar()


def _print_summary(console, result, n_shards: int) -> None:
    from rich.table import Table

    totals = result.totals()
    table = Table(title="pseudo-label", show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("shards", f"{n_shards} ({len(result.done)} labeled, {len(result.resumed)} already "
                            f"done, {len(result.failed)} failed)")
    if result.workers:
        table.add_row("teacher actors", f"{result.workers}")
    table.add_row("images read", f"{totals['read']:,}")
    table.add_row("images labeled (written)", f"{totals['written']:,}")
    table.add_row("  of which without any box", f"{totals['without_boxes']:,}")
    table.add_row("boxes written", f"{totals['boxes']:,}")
    for reason, n in totals["skipped"].items():
        table.add_row(f"skipped: {reason}", f"{n:,}")
    if result.seconds > 0 and result.images:
        table.add_row("images/s (this run)", f"{result.images / result.seconds:,.1f}")
        table.add_row("boxes/s (this run)", f"{result.boxes / result.seconds:,.1f}")
    console.print(table)
    for name in result.failed:
        console.print(f"[red]failed shard {name}:[/] {result.manifest.shards[name].get('error')}")
