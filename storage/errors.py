"""Errors that are the user's input, not a bug: the CLI prints them and exits 2, no traceback."""


class InputError(Exception):
    """Bad or missing input that stops a run (name the file, and the key when there is one)."""
