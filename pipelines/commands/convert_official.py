"""`glipctl convert-official`: an official GLIP .pth -> one of our checkpoint directories."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.common import console


def main(
    checkpoint: Annotated[Path, typer.Argument(help="Official GLIP checkpoint (.pth from github microsoft/GLIP).")],
    out: Annotated[Path, typer.Option("--out", help="Output checkpoint directory (config.json, model.safetensors, "
                                                    "tokenizer).")],
    preset: Annotated[str, typer.Option(help="Model preset to fill: glip-t, glip-l or auto (from the Swin "
                                             "width in the file).")] = "auto",
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Write the model even when keys are "
                                                "unmapped, shapes differ or parameters stay unfilled (they keep "
                                                "their random init); the report names them.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write the full conversion report (JSON: every official key "
                                                     "consumed / ignored with reason / unmapped, every one of our "
                                                     "keys not filled) to this file.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow full unpickling of the file "
                                               "(runs code from it); only for files you trust that the safe "
                                               "loader refuses.")] = False,
) -> None:
    """Convert an official GLIP-T / GLIP-L checkpoint into a glipctl checkpoint directory."""
    from storage.atomic import write_json_atomic
    from storage.errors import InputError

    if preset not in ("auto", "glip-t", "glip-l"):
        raise InputError(f"--preset must be auto, glip-t or glip-l, not {preset!r}")

    from glip.convert import load_official

    model, rep = load_official(checkpoint, preset, allow_partial=allow_partial, trust_pickle=trust_pickle)
    if report is not None:
        write_json_atomic(report, rep.to_dict())
    model.save_pretrained(out)
    console.print(rep.summary())
    for line in rep.problems(10):
        console.print(f"[yellow]warning:[/] {line}")
    console.print(f"wrote {out}")
