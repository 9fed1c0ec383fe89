"""The ``bpsim`` command line: one subcommand per stage, each in ``bpsim.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Each module in bpsim.commands defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["draft", "record", "profile", "fit", "replay", "export", "decode", "bench", "pipeline"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpsim", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bpsim.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"bpsim.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from bpsim.errors import BpsimError

    try:
        return args.run(args)
    except BpsimError as error:
        print(f"bpsim {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bpsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
