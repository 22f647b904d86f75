"""Files shipped with the engine.

``EXAMPLE_FACE``: a 320x320 crop around the face of scikit-image's ``astronaut`` sample (Eileen
Collins, NASA photo S94-44717, public domain). The demo uses it when no ``--face`` is given and the
ComfyUI templates load it as their default face photo.
"""
from pathlib import Path

EXAMPLE_FACE: Path = Path(__file__).resolve().with_name("lynx_example_face.png")

__all__ = ["EXAMPLE_FACE"]
