"""``python -m lynx_batch <command> ...``; also runs as ``python path/to/lynx_batch <command> ...``."""
if __name__ == "__main__" and not __package__:
    # Run as a folder or a file: this package's folder comes first on sys.path, where its
    # queue.py would shadow the standard `queue` module. Put the folder above it there instead.
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]
    _sys.path.insert(0, _os.path.dirname(_here))
    __package__ = "lynx_batch"  # noqa: A001  (lets the relative imports below resolve)

import argparse
import importlib
import sys
from typing import TextIO

from . import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lynx_batch",
                                description="ComfyUI-Lynx batch tools that drive a running ComfyUI server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        cmd = sub.add_parser(name, help=mod.SUMMARY, description=mod.SUMMARY, epilog=mod.build_parser().epilog)
        mod.add_arguments(cmd)
        cmd.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args, stdout or sys.stdout, stderr or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
