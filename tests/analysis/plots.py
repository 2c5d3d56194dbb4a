"""The check every analysis test makes of the PNG its command wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def check_png(path: Path, wider_than: int, taller_than: int = 200) -> None:
    """The PNG at ``path`` is more than ``wider_than`` x ``taller_than`` pixels and not
    blank (its luminance varies)."""
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[1] > wider_than and image.shape[0] > taller_than
    assert image.var() > 0
