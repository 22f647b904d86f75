"""The templates' default face photo in ComfyUI's input folder.

ComfyUI's LoadImage only reads from the input (or output/temp) folder and the template browser has
no way to ship input files for a custom node pack, so the pack copies its example photo
(``lynx_core/assets``) there once, at import. An existing file of that name is never touched.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lynx_core.assets import EXAMPLE_FACE

log = logging.getLogger(__name__)


def copy_example_photo(input_dir: str | os.PathLike[str]) -> Path | None:
    """Put the example photo into ``input_dir`` unless a file of that name is there; its path, or None
    when the folder cannot be written (a warning says so; the templates then need a photo upload)."""
    target = Path(input_dir) / EXAMPLE_FACE.name
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EXAMPLE_FACE, tmp)
        try:
            # A hard link publishes the complete file atomically and fails if the name appeared
            # meanwhile, so a user's file is never overwritten and no half-written photo is visible.
            os.link(tmp, target)
        except FileExistsError:
            pass
        except OSError:
            # File systems without hard links: exclusive create, never overwrite.
            with open(target, "xb") as out:
                out.write(tmp.read_bytes())
    except FileExistsError:
        pass
    except OSError as err:
        log.warning("Lynx: could not copy the example face photo to %s (%s); the templates will ask "
                    "for a photo upload instead", target, err)
        return None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return target


def install_example_photo() -> Path | None:
    """Copy the example photo into ComfyUI's input folder (no-op without ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return None
    return copy_example_photo(folder_paths.get_input_directory())
