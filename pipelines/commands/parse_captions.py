"""`glipctl parse-captions`."""
from pipelines.common import not_implemented


def main() -> None:
    """Not implemented yet."""
    not_implemented("parse-captions")
