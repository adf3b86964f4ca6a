"""`unicode-mllm`: the command line. Each stage adds its subcommand here."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import list_presets, load_preset

    if args.name:
        print(json.dumps(load_preset(args.name), indent=2))
    else:
        print("\n".join(list_presets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unicode-mllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sub.add_parser("presets", help="list model presets, or print one")
    presets.add_argument("name", nargs="?")
    presets.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
