"""The `upstack` command: one entry point, a subcommand per stage.

Each module in `upstack.commands` registers its subcommands (`register(subparsers, common)`) and
imports heavy libraries (torch, transformers) only inside the function that runs the command, so
`upstack upscale` on the pure-copy path never loads torch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading

import upstack.commands
from upstack import __version__
from upstack.errors import UpstackError
from upstack.hub import hide_hub_progress_bars
from upstack.outputs import Terminated, raise_on_sigterm


def _command_modules():
    """The modules of `upstack.commands` that register subcommands, in --help order (helper modules such as
    `output` register nothing and are skipped)."""
    mods = [importlib.import_module(f"upstack.commands.{m.name}")
            for m in pkgutil.iter_modules(upstack.commands.__path__)]
    mods = [m for m in mods if hasattr(m, "register")]
    return sorted(mods, key=lambda m: getattr(m, "ORDER", 100))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info messages")
    parser = argparse.ArgumentParser(
        prog="upstack",
        description="Depth up-scale, train, align, merge and evaluate open LLMs (the SOLAR 10.7B recipe).",
    )
    parser.add_argument("--version", action="version", version=f"upstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        mod.register(sub, common)
    parser.subcommands = sub.choices  # for the usage of a subcommand given unknown arguments
    return parser


def _unknown_arguments(parser: argparse.ArgumentParser, args, extras: list[str]) -> None:
    """Unknown arguments after a subcommand: that subcommand's usage and a "did you mean" (exit 2)."""
    sub = parser.subcommands.get(getattr(args, "command", None), parser)
    options = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}?")
    sub.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unknown_arguments(parser, args, extras)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        hide_hub_progress_bars()
    # SIGTERM (kill, a scheduler's preemption) stops like Ctrl-C: partial outputs removed, training saves a
    # checkpoint; exit 143.
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, raise_on_sigterm) if main_thread else None
    try:
        rc = args.func(args)
    except UpstackError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"error: {what} (partial output removed; re-run to resume where supported)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
