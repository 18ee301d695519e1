"""The nbdcrypt(8) man page, generated from the command line's argparse definitions.

`python -m nbdcrypt.manpage > man/nbdcrypt.8` writes it; tests/test_manpage.py fails when the
committed page differs from what this prints, so the page cannot drift from `--help`. Every
command, option and help text comes from `nbdcrypt.cli.build_parser()`; only the sections no
parser knows (signals, files, environment, exit status) are written here. The output is plain
man(7) roff (.TH, .SH, .SS, .TP, .RS/.RE), ASCII only, and the same on every run (no date).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from nbdcrypt import __version__
from nbdcrypt.cli import build_parser

SUMMARY = "NBD server of device-mapper-style stacks with blk-crypto-style inline encryption"
_HIDDEN = (argparse._HelpAction, argparse._VersionAction)

_SIGNALS = [
    (
        "SIGTERM, SIGINT",
        "Stop: close the listeners, answer new requests with ESHUTDOWN, finish the requests in "
        "flight, flush every backing file (fdatasync) and exit 0 (1 if the final flush failed).",
    ),
    (
        "SIGHUP",
        "Read the configuration file again and apply it without dropping a client (as "
        "nbdcrypt ctl reload does); a configuration with an error is refused whole, logged, "
        "and the running one stays.",
    ),
]
_FILES = [
    ("/etc/nbdcrypt/nbdcrypt.yaml", "The configuration the systemd units serve (docs/CONFIG.md)."),
    ("/etc/nbdcrypt/NAME.yaml", "The configuration of the instance nbdcrypt@NAME.service."),
    (
        "key files, passphrase files, TLS private keys",
        "Refused when group- or world-accessible (mode 0600 or stricter).",
    ),
    (
        "the control socket (server.control)",
        "Created with mode 0600; whoever can use it controls every device of the server.",
    ),
]
_ENVIRONMENT = [
    ("NOTIFY_SOCKET", "sd_notify: READY=1, RELOADING=1, STOPPING=1, STATUS=..., WATCHDOG=1."),
    ("WATCHDOG_USEC, WATCHDOG_PID", "WATCHDOG=1 is sent every half WATCHDOG_USEC."),
    (
        "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
        "Socket activation: the inherited sockets are served instead of server.listen.",
    ),
    ("CREDENTIALS_DIRECTORY", "Where keys with source: {credential: NAME} are read from."),
    (
        "variables named by keys with source: {env: VAR}",
        "A key in hex, removed from the environment once read.",
    ),
]
_EXIT_STATUS = [
    ("0", "Success (serve: stopped cleanly with every write on stable storage)."),
    (
        "1",
        "A run-time failure: a backing file, a key or TLS file, an address in use, a final flush "
        "that failed; for ctl, a command that failed or a server that could not be reached.",
    ),
    ("2", "A configuration error (FILE:LINE: key.path: message) or a usage error."),
]
_SEE_ALSO = (
    "nbd-client(8), nbdinfo(1), nbdcopy(1), nbdsh(1), qemu-img(1), qemu-io(1), dmsetup(8), "
    "cryptsetup(8), systemd.service(5), systemd.socket(5); in the source tree: README.md, "
    "docs/CONFIG.md, docs/OPERATIONS.md, docs/TLS.md, docs/CLIENTS.md, docs/TARGETS.md, "
    "docs/CRYPTO.md, docs/LUKS.md"
)


def text(value: str) -> str:
    """Running text for roff: backslashes and dashes escaped, non-ASCII as \\[uXXXX]."""
    out = value.replace("\\", "\\e").replace("-", "\\-")
    out = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)
    return out


def line(value: str) -> str:
    """A text line that roff cannot take for a request (one starting with . or ')."""
    return "\\&" + value if value.startswith((".", "'")) else value


def bold(value: str) -> str:
    return f"\\fB{text(value)}\\fR"


def italic(value: str) -> str:
    return f"\\fI{text(value)}\\fR"


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, _HIDDEN)]


def _subcommands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return italic(str(action.metavar))
    if action.choices is not None:
        return "|".join(bold(str(c)) for c in action.choices)
    return italic(action.dest.upper())


def _option_usage(action: argparse.Action) -> str:
    """`-c FILE`, `--inactive`, `--progress | --no-progress`: an option as it is typed."""
    if action.nargs == 0:
        return " | ".join(bold(s) for s in action.option_strings)
    return f"{bold(action.option_strings[0])} {_metavar(action)}"


def _positional_usage(action: argparse.Action) -> str:
    name = _metavar(action)
    if action.nargs == "?":
        return f"[{name}]"
    if action.nargs == "+":
        return f"{name}..."
    if action.nargs == "*":
        return f"[{name}...]"
    return name


def synopsis(parser: argparse.ArgumentParser) -> str:
    """The usage of a parser in roff: options first, then positionals, then a subcommand."""
    grouped = {a: g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    parts: list[str] = []
    done: set[argparse._MutuallyExclusiveGroup] = set()
    for action in _visible(parser):
        if not action.option_strings:
            continue
        group = grouped.get(action)
        if group is not None:
            if group not in done:
                done.add(group)
                inner = " | ".join(_option_usage(a) for a in group._group_actions)
                parts.append(f"({inner})" if group.required else f"[{inner}]")
            continue
        usage = _option_usage(action)
        if isinstance(action, argparse._AppendAction):
            usage += "..."
        parts.append(usage if action.required else f"[{usage}]")
    for action in _visible(parser):
        if isinstance(action, argparse._SubParsersAction):
            parts.append(f"{italic(str(action.metavar or 'COMMAND'))} [{italic('ARGS')}]")
        elif not action.option_strings:
            parts.append(_positional_usage(action))
    return " ".join(parts)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An action's help as --help prints it (%(default)s and the like expanded)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    """.TP entries for the options and positionals of a parser that have anything to say."""
    for action in _visible(parser):
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            names = ", ".join(bold(s) for s in action.option_strings)
            head = names if action.nargs == 0 else f"{names} {_metavar(action)}"
        else:
            head = _positional_usage(action)
        described = _help(parser, action)
        if described:  # the synopsis says all there is about the others
            yield ".TP"
            yield line(head)
            yield line(text(described))


def _command(name: str, parser: argparse.ArgumentParser, help_text: str) -> Iterator[str]:
    """One command's subsection: its synopsis, description, options and its own commands."""
    yield f'.SS "{name}"'
    yield line(f"{bold(name)} {synopsis(parser)}")
    yield ".PP"
    yield line(text(parser.description or help_text))
    yield from _options(parser)
    sub = _subcommands(parser)
    if sub is None:
        return
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    yield ".PP"
    yield f"Commands of {bold(name)}:"
    for cmd, child in sub.choices.items():
        yield ".TP"
        yield line(f"{bold(cmd)} {synopsis(child)}".rstrip())
        yield line(text(child.description or helps.get(cmd, "")))
        entries = list(_options(child))
        if entries:
            yield ".RS"
            yield from entries
            yield ".RE"


def _table(title: str, rows: Sequence[tuple[str, str]]) -> Iterator[str]:
    yield f".SH {title}"
    for head, body in rows:
        yield ".TP"
        yield line(bold(head))
        yield line(text(body))


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole page."""
    parser = parser if parser is not None else build_parser()
    sub = _subcommands(parser)
    assert sub is not None
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    out = [
        '.\\" Generated by `python -m nbdcrypt.manpage` from nbdcrypt/cli.py: do not edit.',
        f'.TH NBDCRYPT 8 "" "nbdcrypt {__version__}" "System Administration"',
        ".nh",  # no hyphenation: option names and paths stay whole
        ".ad l",
        ".SH NAME",
        f"nbdcrypt \\- {text(SUMMARY)}",
        ".SH SYNOPSIS",
    ]
    for name, child in sub.choices.items():
        out += [line(f"{bold('nbdcrypt ' + name)} {synopsis(child)}"), ".br"]
    out.pop()  # no break after the last
    out += [".SH DESCRIPTION", line(text(parser.description or ""))]
    out += [
        ".PP",
        "Each command's options follow; "
        f"{bold('nbdcrypt')} {italic('COMMAND')} {bold('--help')} prints the same.",
        ".SH OPTIONS",
        ".TP",
        bold("--version"),
        "Print the version and exit (every command takes it too).",
        ".TP",
        f"{bold('-h')}, {bold('--help')}",
        "Print the usage and exit (every command takes it too).",
        ".SH COMMANDS",
    ]
    for name, child in sub.choices.items():
        out += list(_command(f"nbdcrypt {name}", child, helps.get(name, "")))
    out += list(_table("SIGNALS", _SIGNALS))
    out += list(_table("EXIT STATUS", _EXIT_STATUS))
    out += list(_table("ENVIRONMENT", _ENVIRONMENT))
    out += list(_table("FILES", _FILES))
    out += [".SH SEE ALSO", line(text(_SEE_ALSO))]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
