"""`nbdcrypt stress URI... [options]`: parse, run on uvloop, print the summary, exit.

Exit status 0 when every read verified and nothing failed; 1 on a mismatch, a protocol error,
a client that could not connect or lost its connection, or an error reply (unless
--allow-errors); 2 on usage errors, including options that do not fit the export.
"""

from __future__ import annotations

import argparse
import json
import sys

import uvloop

from nbdcrypt.stress.options import UsageError, options_from_args
from nbdcrypt.stress.options import add_parser as _add_options
from nbdcrypt.stress.report import exit_status, summary_json, summary_text
from nbdcrypt.stress.runner import RunResult, run_stress


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `stress` to the `nbdcrypt` command line."""
    _add_options(sub).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
        result: RunResult = uvloop.run(run_stress(opts, sys.stderr))
    except UsageError as exc:
        print(f"nbdcrypt stress: error: {exc}", file=sys.stderr)
        return 2
    if opts.json:
        print(json.dumps(summary_json(result), indent=2))
    else:
        print(summary_text(result))
    if result.fatal and opts.json:
        print(f"nbdcrypt stress: {result.fatal}", file=sys.stderr)
    return exit_status(result)
