"""``python -m tests.realzoo prepare [--all | NAME...]``: fill the zoo's cache; ``list``: show the models."""

from __future__ import annotations

import argparse
import sys
import time

from tests import realzoo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.realzoo")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="fetch wheels, extract models, generate data and truth")
    prep.add_argument("names", nargs="*")
    prep.add_argument("--all", action="store_true")
    commands.add_parser("list", help="the zoo's models")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in realzoo.names():
            print(f"{name:14} {realzoo.recipe(name).summary}")
        return 0
    chosen = realzoo.names() if args.all else args.names
    if not chosen:
        parser.error("name models to prepare, or --all")
    for name in chosen:
        start = time.monotonic()
        try:
            prepared = realzoo.prepare(name)
        except realzoo.ZooError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        print(f"{name:14} {time.monotonic() - start:6.1f} s  {prepared.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
