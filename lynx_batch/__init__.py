"""Batch tools for ComfyUI-Lynx that talk to a running ComfyUI server over its HTTP API.

    python -m lynx_batch queue --workflow workflows/api/lynx_full_t2v_api.json --faces photos/ ...

Only the standard library is needed (plus ``websocket-client`` for live progress). Nothing here
imports ComfyUI, torch or the node pack: the ComfyUI custom-node entry point never imports this
package, and this package never imports the nodes.
"""

__all__ = ["COMMANDS"]

# Subcommand name -> module with ``add_arguments(parser)`` and ``run(args, stdout, stderr) -> int``.
COMMANDS = {"queue": "lynx_batch.queue", "study": "lynx_batch.study.cli"}
