"""`glipctl demo`."""
from pipelines.common import not_implemented


def main() -> None:
    """Not implemented yet."""
    not_implemented("demo")
