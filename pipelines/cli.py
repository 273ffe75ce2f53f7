"""The ``glipctl`` command line: one typer app, one module per command in ``pipelines/commands``.

Command modules import heavy libraries (torch, Ray, spaCy) inside their functions so
``glipctl --help`` stays instant.
"""
from __future__ import annotations

import functools

import typer

from pipelines.commands import (convert_official, demo, evaluate, export, inspect, pack, parse_captions,
                                predict, prompt_tune, pseudo_label, train_student)
from pipelines.common import console
from storage.errors import InputError

app = typer.Typer(
    name="glipctl",
    help="Grounded pseudo-labeling at web scale: parse captions, ground them with a GLIP teacher, "
         "train a student on gold + pseudo-labels, inspect and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _user_errors_exit_2(fn):
    """An ``InputError`` anywhere in a command becomes one red line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(code=2) from None
    return wrapper


for _name, _module in [("parse-captions", parse_captions), ("pseudo-label", pseudo_label),
                       ("pack", pack), ("train-student", train_student), ("prompt-tune", prompt_tune),
                       ("inspect", inspect),
                       ("evaluate", evaluate), ("predict", predict), ("export", export), ("demo", demo),
                       ("demo-world", demo.world_main),
                       ("convert-official", convert_official)]:
    _fn = getattr(_module, "main", _module)
    app.command(_name, help=_fn.__doc__)(_user_errors_exit_2(_fn))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
