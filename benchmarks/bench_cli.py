"""Argument parsing shared by the benchmark scripts: a bad argument is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors print ``<prog>: <message>`` (no usage dump) and exit with 2."""

    def error(self, message: str):
        print(f"{self.prog.removesuffix('.py')}: {message}", file=sys.stderr)
        sys.exit(2)


def parser(doc: str | None) -> OneLineParser:
    return OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
