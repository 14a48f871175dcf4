"""The ``vramcal`` command: one parser, subcommands registered by each package.

Each package's ``cli`` module must stay light at import time (no torch, transformers, pandas, scipy):
heavy imports happen inside the command handlers, so ``vramcal estimate`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from estimator.errors import UserError

# Modules that provide ``register(subparsers)``; each subcommand sets ``func`` via set_defaults.
COMMAND_MODULES = ("estimator.cli", "harness.cli", "harness.trace_cli", "calibration.cli", "calibration.vllm_cli")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="vramcal",
        description="GPU memory you can plan on: estimate, measure and calibrate LLM VRAM use.",
    )
    from vramcal import __version__

    parser.add_argument("--version", action="version", version=f"vramcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a package not yet present in this checkout
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"vramcal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vramcal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vramcal models | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
