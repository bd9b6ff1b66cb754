"""A CLI as a table of commands (shared by `python -m models` and `python -m training`): each command is a name, a
one-line help, a function adding its options and a function running it; `--help` lists them one line each."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line: what `--help` lists
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def build_parser(prog: str, commands: Sequence[Command]) -> argparse.ArgumentParser:
    names = [c.name for c in commands]
    if len(set(names)) != len(names):
        raise ValueError(f"{prog}: duplicate command names in {names}")
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for c in commands:
        c.options(sub.add_parser(c.name, help=c.help, description=c.help))
    return ap


def run_table(prog: str, commands: Sequence[Command], argv: list[str] | None = None) -> int:
    """Parse argv and run the chosen command; its return value (None = 0) is the exit status."""
    args = build_parser(prog, commands).parse_args(argv)
    rc = next(c for c in commands if c.name == args.cmd).run(args)
    return int(rc or 0)
