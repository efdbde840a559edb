"""The command line: ``python -m clusterhub demo`` (a short tour) and
``python -m clusterhub bench`` (clusterhub against the standard-library peers,
in under a minute).

The help texts below are plain text: argparse prints them as they are.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

DESCRIPTION = """\
clusterhub: messages and crash-robust global locks between a master process
and its forked workers (Linux).
"""

EPILOG = """\
examples:
  python -m clusterhub demo                  a short tour, explained as it runs
  python -m clusterhub bench                 the comparison, as a table
  python -m clusterhub bench --only lock     only the lock groups
  python -m clusterhub serve @myapp          a master for processes that connect
  python -m clusterhub COMMAND --help        a command's own options
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clusterhub", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    p = sub.add_parser(
        "bench", help="compare clusterhub with the standard-library peers (under a minute)",
        description="Measure clusterhub and the standard-library tools a user would pick instead "
                    "in one run, interleaved, and print medians and clusterhub/peer ratios "
                    "against the targets.",
    )
    p.add_argument("--json", metavar="FILE", nargs="?", const="-",
                   help="also write the results as JSON to FILE (alone: JSON to stdout, no table)")
    p.add_argument("--only", metavar="NAME", action="append",
                   help="only the groups whose name contains NAME (repeatable), e.g. round-trip")
    p = sub.add_parser(
        "serve", help="run a master with no program of its own, for processes that connect",
        description="Run a master hub at ADDRESS until SIGTERM or SIGINT: processes started by "
                    "anything else join it with clusterhub.connect(ADDRESS).  ADDRESS is @name "
                    "(a Linux abstract socket) or a filesystem path.  CLUSTERHUB_AUTHKEY in the "
                    "environment, if set, is the authkey they must know.",
    )
    p.add_argument("address", metavar="ADDRESS", help="@name or a path")
    p.add_argument("--handlers", metavar="MODULE:FUNCTION",
                   help="call FUNCTION(hub) first, to register handlers")
    sub.add_parser(
        "demo", help="a short tour of clusterhub",
        description="A short tour that explains itself: fork workers, make requests both ways, "
                    "broadcast, let a worker die with a request pending, and kill a worker that "
                    "holds a global lock (the next holder is told it recovered the lock).",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .serve import serve

        return serve(args.address, args.handlers)
    if args.command == "demo":
        from .demo import main as demo

        return demo()
    from .bench.cli import bench

    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
