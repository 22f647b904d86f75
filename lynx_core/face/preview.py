"""Preview pictures: every detected face with its box, 5 points and left-to-right index.

Chosen faces are drawn in green, the others in orange, so a group photo shows at a glance which
face became the identity. An image with no face gets a red "no face found" banner.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .imageops import to_uint8_rgb
from .types import DetectedFace

__all__ = ["draw_preview", "CHOSEN_COLOUR", "OTHER_COLOUR", "POINT_COLOURS"]

CHOSEN_COLOUR = (40, 220, 60)
OTHER_COLOUR = (255, 150, 20)
# Left eye, right eye, nose, left mouth corner, right mouth corner (image sides).
POINT_COLOURS = ((255, 40, 40), (40, 120, 255), (255, 255, 40), (255, 40, 255), (40, 255, 255))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def draw_preview(
    image: np.ndarray,
    faces: Sequence[DetectedFace],
    chosen: Iterable[int] = (),
) -> np.ndarray:
    """Return a uint8 RGB copy of ``image`` annotated with ``faces`` (indices as given)."""
    canvas = Image.fromarray(to_uint8_rgb(image, "preview image"))
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    unit = max(1, round(min(w, h) / 256))
    font = _font(max(10, 7 * unit + 5))
    chosen_set = set(int(c) for c in chosen)
    for idx, face in enumerate(faces):
        colour = CHOSEN_COLOUR if idx in chosen_set else OTHER_COLOUR
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2 * unit)
        r = 1.5 * unit + 1
        for (px, py), pc in zip(face.kps, POINT_COLOURS):
            draw.ellipse([px - r, py - r, px + r, py + r], fill=pc, outline=(0, 0, 0))
        label = f"#{idx}" + (" used" if idx in chosen_set else "") + f" {face.score:.2f}"
        text_h = getattr(font, "size", 11)
        tx, ty = x1, max(0.0, y1 - text_h - 4 * unit)
        box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour, font=font)
    if not faces:
        label = "no face found"
        box = draw.textbbox((4, 4), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((4, 4), label, fill=(255, 60, 60), font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()
