"""The whole study on one page: run (or collect) every analysis and build the report.

Each analysis is run as its own command (``moescope NAME ... --out OUT/NAME``), in this process,
so the command line in its section is exactly what produced it; the report then *collects* the
folder (``result.json``, the tables' CSVs, the PNG figures) into a
:class:`~moescope.report.Section`. ``--from DIR`` collects folders written earlier instead of
running anything. A command that is not installed, rejects its options or fails becomes a
visible note in its section; the report itself does not fail.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from facemoe_model.fileio import atomic_write

from ..errors import MoescopeError
from ..report import Section, checkpoint_hashes, failed_section
from .report_sections import ANALYSES, Analysis, ReportInputs

__all__ = ["ReportInputs", "Analysis", "ANALYSES", "plan_commands", "run_analysis", "collect_folder", "find_folders", "build_sections"]

COMMAND_FILE = "report_command.txt"
"""Written next to each analysis folder's result.json by the report: the exact command line."""


# -- running one command -----------------------------------------------------------------------
def _command_parser(command: str) -> argparse.ArgumentParser:
    """A parser with only ``command`` registered (ImportError when it is not installed)."""
    module = importlib.import_module(f"moescope.commands.{command}")
    parser = argparse.ArgumentParser(prog="moescope", add_help=False)
    module.register(parser.add_subparsers(dest="command"))
    return parser


def _options_of(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices[command]._option_string_actions)


def plan_commands(analysis: Analysis, inputs: ReportInputs, out_dir: Path | None = None,
                  known: set[str] | None = None) -> tuple[list[str], list[str]]:
    """The argv (``[command, ...]``) of ``analysis`` and notes on options it dropped.

    Light options the installed command lacks (``known``: its option strings) are left out.
    """
    argv = [analysis.command, *analysis.argv(inputs)]
    notes = []
    if not inputs.full:
        for option in analysis.light:
            if known is not None and option[0] not in known:
                notes.append(f"lighter setting {' '.join(option)} left out: this moescope {analysis.command} has no {option[0]}")
                continue
            argv += list(option)
    if out_dir is not None:
        argv += ["--out", str(out_dir)]
    return argv, notes


def _shell(argv: Sequence[str]) -> str:
    return shlex.join(["moescope", *argv])


def run_analysis(analysis: Analysis, inputs: ReportInputs, out_dir: Path) -> Section:
    """Run ``analysis``'s command with ``--out out_dir/KEY`` and collect its folder into a section.

    The command runs in this process with its stdout/stderr captured; an unknown command,
    rejected options, a one-line error or any exception becomes the section's note.
    """
    reason = analysis.applies(inputs)
    if reason:
        return failed_section(analysis.number, analysis.title, reason, status="not applicable",
                              description=analysis.description, id=analysis.key.replace("_", "-"))
    folder = out_dir / analysis.key
    try:
        parser = _command_parser(analysis.command)
    except ImportError as exc:
        argv, _ = plan_commands(analysis, inputs, folder)
        return failed_section(
            analysis.number, analysis.title,
            f"not available: this installation has no `moescope {analysis.command}` command ({exc})",
            status="not applicable", commands=[_shell(argv)], description=analysis.description,
            id=analysis.key.replace("_", "-"),
        )
    argv, notes = plan_commands(analysis, inputs, folder, _options_of(parser, analysis.command))
    command = _shell(argv)
    captured = io.StringIO()
    start, wall_start = time.perf_counter(), time.time() - 1
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                raise MoescopeError(f"`{command}` rejected its options: {_last_line(captured.getvalue())}") from None
            args.argv = argv
            status = args.run(args)
        if status:
            raise MoescopeError(f"exited with status {status}: {_last_line(captured.getvalue())}")
    except MoescopeError as exc:
        return _failed(analysis, str(exc), command)
    except Exception as exc:  # noqa: BLE001 - one analysis failing must not lose the others
        return _failed(analysis, f"{type(exc).__name__}: {exc}", command)
    seconds = time.perf_counter() - start
    try:
        section = collect_folder(folder, analysis, since=wall_start)
    except MoescopeError as exc:  # e.g. a command that ignores --out
        return _failed(analysis, f"ran, but its output cannot be collected: {exc}", command)
    atomic_write(folder / COMMAND_FILE, command + "\n")
    section.commands = [command]
    section.settings["run_time_s"] = round(seconds, 1)
    section.warnings += notes
    if analysis.light and not inputs.full and analysis.light_note:
        section.warnings.append(f"lighter than the command's defaults for the report: {analysis.light_note}; "
                                "`moescope report --full` uses the defaults")
    return section


def _last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "(no message)"


def _failed(analysis: Analysis, message: str, command: str) -> Section:
    return failed_section(analysis.number, analysis.title, message, commands=[command],
                          description=analysis.description, id=analysis.key.replace("_", "-"))


# -- collecting folders ------------------------------------------------------------------------
def _read_result(folder: Path) -> dict:
    path = folder / "result.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoescopeError(f"{folder} is not an analysis --out folder: it has no result.json") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise MoescopeError(f"cannot read {path}: {exc}") from None


def _table(folder: Path, name: str, records: list) -> pd.DataFrame:
    csv = folder / f"{name}.csv"
    if csv.is_file():
        try:
            return pd.read_csv(csv)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    return pd.DataFrame(records)


def _reconstructed_command(result: dict) -> str:
    return f"moescope {result.get('command', '?')} {' '.join(result.get('checkpoints', []))}  # reconstructed: the folder has no {COMMAND_FILE}"


def collect_folder(folder: str | Path, analysis: Analysis, since: float | None = None) -> Section:
    """The section of one analysis ``--out`` folder: its tables (CSV), figures (PNG; with ``since``,
    only those written after that time, so a re-run's stale figures are left out), summary,
    settings, warnings, checkpoint hashes and the command that wrote it."""
    folder = Path(folder)
    result = _read_result(folder)
    tables = {name: _table(folder, name, records) for name, records in (result.get("tables") or {}).items()}
    figures = {png.stem: png.read_bytes() for png in sorted(folder.glob("*.png"))
               if since is None or png.stat().st_mtime >= since}
    command_file = folder / COMMAND_FILE
    command = command_file.read_text(encoding="utf-8").strip() if command_file.is_file() else _reconstructed_command(result)
    return Section(
        number=analysis.number, title=analysis.title, tables=tables, figures=figures,
        summary=dict(result.get("summary") or {}),
        settings={"command": result.get("command"), "folder": str(folder), **(result.get("settings") or {})},
        checkpoints=checkpoint_hashes(result.get("checkpoints") or []),
        warnings=list(result.get("warnings") or []), commands=[command],
        description=analysis.description, id=analysis.key.replace("_", "-"),
    )


def find_folders(roots: Sequence[str | Path]) -> list[Path]:
    """Analysis folders under ``roots``: each root that has a result.json, else its sub-folders that do."""
    found: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise MoescopeError(f"--from {root}: no such folder")
        if (root / "result.json").is_file():
            found.append(root)
            continue
        subs = sorted(p.parent for p in root.glob("*/result.json"))
        if not subs:
            raise MoescopeError(f"--from {root}: no result.json in it or its sub-folders (give analysis --out folders)")
        found += subs
    return found


def _collected(analyses: Sequence[Analysis], roots: Sequence[str | Path]) -> list[Section]:
    folders = find_folders(roots)
    by_key: dict[str, Section] = {}
    for folder in folders:
        result = _read_result(folder)
        match = next((a for a in analyses if a.command == result.get("command") and a.matches(result) and a.key not in by_key), None)
        if match is not None:
            by_key[match.key] = collect_folder(folder, match)
    sections = []
    for a in analyses:
        sections.append(by_key.get(a.key) or failed_section(
            a.number, a.title, f"not collected: no `moescope {a.command}` folder among --from {' '.join(map(str, roots))}",
            status="not applicable", description=a.description, id=a.key.replace("_", "-")))
    return sections


@dataclass
class ReportRun:
    """The sections and how long each took (seconds)."""

    sections: list[Section] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def build_sections(inputs: ReportInputs, out_dir: str | Path, *, from_dirs: Sequence[str | Path] = (),
                   only: Sequence[str] | None = None, log: Callable[[str], Any] | None = None) -> ReportRun:
    """Every section of the report, in paper order: run each analysis into ``out_dir/KEY``
    (or, with ``from_dirs``, collect earlier folders); ``only`` limits it to some keys."""
    analyses = [a for a in ANALYSES if only is None or a.key in only]
    run = ReportRun()
    if from_dirs:
        run.sections = _collected(analyses, from_dirs)
        return run
    for analysis in analyses:
        start = time.perf_counter()
        if log:
            log(f"{analysis.number} {analysis.key} ...")
        section = run_analysis(analysis, inputs, Path(out_dir))
        run.seconds[analysis.key] = time.perf_counter() - start
        if log:
            log(f"{analysis.number} {analysis.key}: {section.status} in {run.seconds[analysis.key]:.1f} s")
        run.sections.append(section)
    return run
