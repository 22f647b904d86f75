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

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folders  # noqa: E402
    from .nodes.example_photo import install_example_photo  # noqa: E402

    register_model_folders()
    install_example_photo()
else:
    # Imported as a plain file, not as ComfyUI's package: pytest does that while collecting a clone
    # whose folder name is not a module name (``ComfyUI-Lynx``). Nothing to register then.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
