"""``python -m clusterhub demo`` (a short tour) and ``python -m clusterhub bench``
(clusterhub against the standard-library peers, in under a minute)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterhub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "bench", help="compare clusterhub with the stdlib peers (under a minute)",
        description="Measure clusterhub and the standard-library tools a user would pick instead "
                    "in one run, interleaved, and print medians and clusterhub/peer ratios "
                    "against the targets.",
    )
    p.add_argument("--json", metavar="FILE", nargs="?", const="-",
                   help="also write the results as JSON to FILE (alone: JSON to stdout, no table)")
    p.add_argument("--only", metavar="NAME", action="append",
                   help="only the groups whose name contains NAME (repeatable), e.g. round-trip")
    sub.add_parser("demo", help="a short tour of clusterhub")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo

        return demo()
    from .bench import bench

    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
