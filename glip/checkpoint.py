"""Loading a teacher: a GLIP checkpoint directory (``save_pretrained``) or an official GLIP ``.pth``."""
from __future__ import annotations

import os
from pathlib import Path


def load_teacher(path: str | os.PathLike, map_location: str = "cpu", preset: str | None = None):
    """A ``GLIP`` in eval mode from a checkpoint directory, or from an official ``.pth`` converted on the fly
    (``glip.convert``; ``preset`` picks "glip-t"/"glip-l", guessed from the file otherwise)."""
    from glip.model import GLIP

    path = Path(path)
    if path.is_dir():
        return GLIP.from_pretrained(path, map_location=map_location)
    if path.suffix in (".pth", ".pt", ".bin") and path.is_file():
        from glip import convert  # written by the "official" engineer

        return convert.load_official_model(path, preset=preset).to(map_location).eval()
    raise FileNotFoundError(f"{path}: neither a GLIP checkpoint directory nor an official .pth file")
