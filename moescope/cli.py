"""The ``moescope`` command line: the parser, the error boundary and the command list.

The error boundary (:func:`main`): every failure caused by input — a bad checkpoint, an
unreadable file or folder, a wrong option value, an unwritable ``--out``, an environment
variable, an input too large for memory — prints ONE line ``moescope: error: ...`` on stderr
and exits with status 2; never a traceback (argparse errors too, without the usage block).
Options are checked before any model is loaded (:func:`moescope.options.check_options`).
A closed stdout (``moescope info | head -1``) ends quietly with status 141 (as a program
killed by SIGPIPE). Anything else is a bug: one line ``moescope: error: internal error ...``
and status 1. ``--debug`` (anywhere before ``--``) or ``MOESCOPE_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from typing import Sequence

from .errors import MoescopeError

COMMANDS = ("regions", "cka", "ablate", "train", "eval", "info", "models", "bench", "report", "maps", "attack", "degrade")
"""The subcommands, in --help order: each is a module ``moescope.commands.NAME``."""


def one_line(text: object) -> str:
    """``text`` on one line: control characters (a newline in a file name ...) written as escapes."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def emit(result, args: argparse.Namespace, render) -> None:
    """Show an AnalysisResult: files (``--out``, written first), human text (``render(result) -> str``), JSON.
    Under ``torchrun`` only rank 0 shows and writes (:func:`moescope.distributed.is_main`)."""
    from .distributed import is_main

    if not is_main():
        return
    top_k = getattr(args, "loaded_top_k", None)
    if top_k is not None:
        result.settings.setdefault("top_k", top_k)
    written = None
    if getattr(args, "out", None):
        written = result.save(args.out, replace=getattr(args, "out_replace", True))
    text_stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    print(render(result), file=text_stream)
    for warning in result.warnings:
        print(f"warning: {one_line(warning)}", file=sys.stderr)
    if written is not None:
        print(f"wrote {len(written)} files to {one_line(args.out)}", file=sys.stderr)
    if getattr(args, "json", False):
        result.write_json(sys.stdout)
        sys.stdout.write("\n")


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block: an error is one line ``moescope: error: ...`` and
    ``SystemExit(2)``, as argparse's own (callers that catch SystemExit keep working)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"moescope: error: {one_line(' '.join(message.split()))} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command of :data:`COMMANDS`; a command module that fails to import is an error."""
    parser = _Parser(
        prog="moescope",
        description="Analyse Mixture-of-Experts routing in FaceMoE and other MoE vision transformers. "
        "Errors are one line (exit status 2); --debug anywhere (or MOESCOPE_DEBUG=1) shows tracebacks.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also MOESCOPE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"moescope.commands.{name}")
        except ImportError as exc:
            raise RuntimeError(f"moescope command {name!r} cannot be imported: {exc}") from exc
        module.register(sub)
    return parser


def _debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted anywhere before ``--``) and whether debugging is on."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("MOESCOPE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], debug


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit status of an error reaching the boundary."""
    if isinstance(exc, MoescopeError):
        return str(exc), getattr(exc, "exit_code", 2)
    if isinstance(exc, MemoryError):
        detail = f" ({exc})" if str(exc) else ""
        return f"out of memory{detail}; use fewer or smaller images or a smaller --batch-size", 2
    if isinstance(exc, OSError):
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        reason = exc.strerror or str(exc) or type(exc).__name__
        return (f"{reason}: {' -> '.join(map(str, names))}" if names else reason), 2
    if isinstance(exc, UnicodeError):
        return f"a text input is not valid UTF-8 ({exc})", 2
    detail = " ".join(str(exc).split())[:200]
    return f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}); rerun with --debug for the traceback", 1


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the exit flush raises nothing."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def _closed_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    argv, debug = _debug_flag([os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)])
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv  # the exact command line, recorded by commands that write provenance
        args.debug = debug
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        from .options import check_options

        check_options(args)
        status = args.run(args)
        sys.stdout.flush()
        return int(status or 0)
    except KeyboardInterrupt:
        print("moescope: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:
        if _closed_pipe(exc):
            _quiet_stdout()
            return 141
        if debug:
            raise
        message, status = describe_error(exc)
        try:
            print(f"moescope: error: {one_line(message)}", file=sys.stderr)
        except OSError:
            pass
        return status


if __name__ == "__main__":
    sys.exit(main())
