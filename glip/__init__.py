"""glip: the GLIP network (image backbone + FPN, BERT text encoder, deep fusion, grounding head), its losses,
span<->token maps, post-processing and checkpoints. No Ray, no dataset formats.

``from glip import GLIP, GLIPConfig, load_teacher``. Importing the package is cheap: torch and transformers are
imported when one of these names is first used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["GLIP", "GLIPConfig", "load_teacher"]

if TYPE_CHECKING:  # pragma: no cover
    from glip.checkpoint import load_teacher
    from glip.config import GLIPConfig
    from glip.model import GLIP


def __getattr__(name: str) -> Any:
    if name == "GLIP":
        from glip.model import GLIP
        return GLIP
    if name == "GLIPConfig":
        from glip.config import GLIPConfig
        return GLIPConfig
    if name == "load_teacher":
        from glip.checkpoint import load_teacher
        return load_teacher
    raise AttributeError(f"module 'glip' has no attribute {name!r}")
