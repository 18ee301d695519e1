"""man/nbdcrypt.8: generated from the argparse definitions, committed, and renderable.

The committed page must be what `python -m nbdcrypt.manpage` prints now (regenerate it with
`python -m nbdcrypt.manpage > man/nbdcrypt.8` after changing the command line), groff must
format it without a warning, and man(1) must show every command and option.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from conftest import ROOT, require_tool, run

from nbdcrypt.cli import build_parser
from nbdcrypt.manpage import render, text

PAGE = ROOT / "man" / "nbdcrypt.8"
REGENERATE = "python -m nbdcrypt.manpage > man/nbdcrypt.8"


def test_committed_page_is_up_to_date() -> None:
    generated = run([sys.executable, "-m", "nbdcrypt.manpage"], cwd=ROOT).stdout
    assert generated == render()
    assert PAGE.read_text() == generated, f"man/nbdcrypt.8 is out of date: run {REGENERATE}"


def test_groff_formats_it_without_warnings() -> None:
    proc = run([require_tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(PAGE)])
    assert proc.stderr == "", proc.stderr
    assert PAGE.read_text().isascii()


def every_option(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= every_option(child)
    return found


def test_man_shows_every_command_and_option() -> None:
    env = {**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0", "LC_ALL": "C.UTF-8"}
    proc = run([require_tool("man"), "-l", str(PAGE)], env=env)
    shown = re.sub(r".\x08", "", proc.stdout)  # overstrike bold, if any
    assert proc.stderr == "", proc.stderr
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "SIGNALS", "EXIT STATUS"):
        assert f"\n{heading}\n" in shown, heading
    for command in ("serve", "check", "ctl", "luks", "stress"):
        assert f"nbdcrypt {command} " in shown, command
    for command in ("ls", "status", "table", "info", "load", "suspend", "resume", "clear",
                    "evict-key", "reload", "dump"):  # fmt: skip
        assert re.search(rf"^ {{7}}{command}\b", shown, re.M), command
    for option in sorted(every_option(build_parser())):
        assert option in shown, option
    assert "--log-format text|json" in shown
    assert "SIGHUP" in shown


def test_roff_escaping() -> None:
    assert text("a-b \\ c") == "a\\-b \\e c"
    assert text("x\u2192y") == "x\\[u2192]y"


def test_systemd_units_point_at_the_page() -> None:
    for unit in ("nbdcrypt.service", "nbdcrypt@.service", "nbdcrypt.socket"):
        assert "Documentation=man:nbdcrypt(8)" in (ROOT / "systemd" / unit).read_text(), unit
