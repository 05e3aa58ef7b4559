"""The command line: the default benchmark's options, and one subcommand per other job."""

from __future__ import annotations

import argparse
import shlex
import sys

from . import core, ops, profile, prologue, results, tables

PROG = "python -m ccgqa_compile.bench"
SUBCOMMANDS = {
    "core": core,
    "prologue": prologue,
    "profile": profile,
    "tables": tables,
    "record": results,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description=ops.__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=f"'{PROG} COMMAND --help' describes each subcommand.",
    )
    ops.add_arguments(ap)
    sub = ap.add_subparsers(
        dest="command", metavar="COMMAND", title="subcommands (without one: the benchmark above)"
    )
    for name, module in SUBCOMMANDS.items():
        parser = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ops.check_args(ap, args)
    return args


def main(argv=None):
    """Run the benchmark or subcommand ``argv`` names; returns what it measured."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.source = shlex.join([*PROG.split(), *argv])  # each results row names its command
    if args.command is None:
        return ops.run(args)
    return SUBCOMMANDS[args.command].run(args)
