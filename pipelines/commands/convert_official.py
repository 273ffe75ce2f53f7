"""`glipctl convert-official`: an official GLIP .pth -> one of our checkpoint directories."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.common import console


def main(
    checkpoint: Annotated[str, typer.Argument(help="Official GLIP checkpoint (.pth from github microsoft/GLIP); "
                                                   "a local path or a URI.")],
    out: Annotated[str, typer.Option("--out", help="Output checkpoint directory (config.json, model.safetensors, "
                                                   "tokenizer); a local path or a URI.")],
    preset: Annotated[str, typer.Option(help="Model preset to fill: glip-t, glip-l or auto (from the Swin "
                                             "width in the file).")] = "auto",
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Write the model even when keys are "
                                                "unmapped, shapes differ or parameters stay unfilled (they keep "
                                                "their random init); the report names them.")] = False,
    report: Annotated[str | None, typer.Option(help="Write the full conversion report (JSON: every official key "
                                                    "consumed / ignored with reason / unmapped, every one of our "
                                                    "keys not filled) to this file (local path or URI).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow full unpickling of the file "
                                               "(runs code from it); only for files you trust that the safe "
                                               "loader refuses.")] = False,
) -> None:
    """Convert an official GLIP-T / GLIP-L checkpoint into a glipctl checkpoint directory."""
    from storage import fs
    from storage.errors import InputError

    if preset not in ("auto", "glip-t", "glip-l"):
        raise InputError(f"--preset must be auto, glip-t or glip-l, not {preset!r}")
    if fs.kind_of(checkpoint) != "file":
        raise InputError(f"{checkpoint}: no such checkpoint file")

    from glip.convert import load_official

    model, rep = load_official(Path(fs.local_copy(checkpoint)), preset, allow_partial=allow_partial,
                               trust_pickle=trust_pickle)
    if report is not None:
        fs.write_json(report, rep.to_dict())
    save_model(model, out)
    console.print(rep.summary())
    for line in rep.problems(10):
        console.print(f"[yellow]warning:[/] {line}")
    console.print(f"wrote {out}")


def save_model(model, out: str) -> None:
    """``model.save_pretrained`` to a local folder or a URI (saved locally, then uploaded with
    ``config.json`` last, so the destination never looks complete before it is)."""
    import tempfile

    from storage import fs
    from storage.checkpoints import upload_checkpoint
    from pipelines.training.checkpointing import staging_root

    if not fs.is_remote(out):
        model.save_pretrained(fs.normalize(out))
        return
    staging_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-", dir=staging_root()) as tmp:
        model.save_pretrained(tmp)
        upload_checkpoint(tmp, out)
