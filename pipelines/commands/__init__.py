"""One module per glipctl command; each exposes ``main`` with its typer options."""
