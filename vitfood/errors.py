"""How the commands fail: the one exception type they turn into a single clear line on stderr, their exit
status for it, and an argument parser whose flag errors are that one line too.

The lowest layer: every module may import it, and it imports no other vitfood module.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2  # bad flags, an unusable model, dataset or output folder (argparse's own status for bad flags)


class VitfoodError(Exception):
    """A problem with the user's input or environment, worded for the user (no traceback shown)."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message', short enough for a one-line error that wraps a library's."""
    text = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def command_name(script: str) -> str:
    """The command's name in its messages: train.py / infer.py / prepare.py, or vitfood-train / vitfood-infer /
    vitfood-prepare when it runs as that console script."""
    name = os.path.basename(sys.argv[0] or "")
    return name if name.startswith("vitfood-") else script


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a flag error (an unknown flag, `--epochs 1.5`, a bad choice) is one line and exit 2, as every
    other error of the commands: `train.py: error: argument --epochs: invalid int value: '1.5'`. The usage block
    that argparse prints first would bury it; `--help` still shows it."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
