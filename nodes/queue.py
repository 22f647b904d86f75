"""Moved: the queue tool is now ``python -m lynx_batch queue`` (package ``lynx_batch/``).

This shim keeps old scripts working: ``python -m nodes.queue ...`` and
``python path/to/ComfyUI-Lynx/nodes/queue.py ...`` say the new command once on stderr and run it
with the same arguments. The custom-node package never imports this file.
"""
import os
import sys

NEW_COMMAND = "python -m lynx_batch queue"


def main(argv: list[str] | None = None) -> int:
    sys.stderr.write(f"note: `python -m nodes.queue` is now `{NEW_COMMAND}` (same options); "
                     "this old name forwards to it.\n")
    from lynx_batch.queue import main as queue_main

    return queue_main(argv)


if __name__ == "__main__":
    # The pack folder must be importable (for lynx_batch), and this file's own folder must not be
    # on sys.path: run as a script it comes first there, and this file would shadow stdlib `queue`.
    _here = os.path.dirname(os.path.abspath(__file__))
    _pack = os.path.dirname(_here)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    if _pack not in [os.path.abspath(p or ".") for p in sys.path]:
        sys.path.insert(0, _pack)
    sys.exit(main())
