"""ComfyUI-Lynx: ComfyUI entry point (ComfyUI imports this folder as a package).

The engine (``lynx_core``) is imported by absolute name, so this folder is appended to
``sys.path`` (appended, never prepended: ComfyUI's own top-level modules, ``nodes`` among them,
must keep precedence). The pack's ``nodes`` package is reached relatively, as ``.nodes``.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folders  # noqa: E402

register_model_folders()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
