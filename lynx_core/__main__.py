"""Command line: `python -m lynx_core demo [...]` and `python -m lynx_core train [...]`."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    from . import demo
    from .train import run as train_run
    parser = argparse.ArgumentParser(prog="python -m lynx_core")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.build_parser(sub.add_parser("demo", help="run the whole Lynx chain (tiny random model by default)",
                                     description=demo.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    train_run.build_parser(sub.add_parser("train", help="fine-tune the Lynx adapters (see docs/training.md)",
                                          description=train_run.__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            demo.run(args)
        elif args.command == "train":
            return train_run.main_train(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        # User errors (bad sizes, missing or mismatched files, bad options): the message, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
