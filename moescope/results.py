"""Analysis results: tidy tables + summary, written as CSV/Markdown/LaTeX/JSON/PNG, complete or absent.

Every analysis command returns an :class:`AnalysisResult`. Its ``to_json_dict`` is the
machine-readable contract of ``--json`` (see docs/analyses.md, "Machine-readable output").

**Outputs are complete or absent.** :meth:`AnalysisResult.save` writes every file first as an
anonymous file (``O_TMPFILE``: it has no name, so a killed process leaves nothing behind),
then links them into a hidden sibling folder ``.<name>.moescope-<pid>-<token>`` and renames
that onto the output folder in one step. A folder holding an earlier result (it has a
``result.json``) is *replaced as a whole*: its files never mix with the new ones. A folder
that holds anything else is refused (:func:`check_out_dir`), so ``--out ~`` can never wipe a
home folder. Single files (``--export-tokens``) go through :func:`atomic_path`, the same way.
Staging folders of killed runs (the short window of the final rename) are removed by the
next save into the same parent folder.
"""
from __future__ import annotations

import ctypes
import errno
import io
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
import pandas as pd

from .errors import MoescopeError

__all__ = ["AnalysisResult", "atomic_write", "atomic_path", "check_out_dir", "check_out_file", "is_result_folder", "to_jsonable"]

_STAGING = ".moescope-"
"""Marker in the names of staging folders: ``.<name>.moescope-<pid>-<token>``."""


def to_jsonable(value: Any) -> Any:
    """Convert numpy/pandas/torch scalars and containers to plain JSON types (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return _records(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item())
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """``to_jsonable(frame.to_dict(orient="records"))``, converted column by column: one set of
    row dicts instead of two (a per-image table of 10,000 images has about 100,000 rows)."""
    return list(_rows(frame))


def _rows(frame: pd.DataFrame) -> Iterator[dict[str, Any]]:
    """The rows of :func:`_records`, one at a time."""
    keys = [str(c) for c in frame.columns]
    columns = []
    for index in range(frame.shape[1]):
        column = frame.iloc[:, index]
        kind = "" if isinstance(column.dtype, pd.api.extensions.ExtensionDtype) else column.dtype.kind  # numpy dtypes
        if kind == "f":
            values = [v if math.isfinite(v) else None for v in column.tolist()]
        elif kind and kind in "iub":
            values = column.tolist()
        else:
            values = [None if v is pd.NA else to_jsonable(v) for v in column.tolist()]  # as to_dict boxes NA
        columns.append(values)
    return (dict(zip(keys, row)) for row in zip(*columns))


@dataclass
class AnalysisResult:
    """The outcome of one analysis command.

    Attributes:
        command: the command name (``regions``, ``cka``, ``ablate`` ...).
        checkpoints: the checkpoints analysed (paths or ``demo:before``).
        settings: every option that determined the result (seed included).
        tables: tidy DataFrames by name; each is written as ``NAME.csv/.md/.tex``.
        summary: headline numbers (images analysed, images without a face, accuracy ...).
        warnings: human-readable caveats (dropped batches, skipped images ...).
        figures: matplotlib figures by file stem, or zero-argument callables that draw them
            (drawn only when needed: :meth:`figure`, :meth:`save`); written as ``STEM.png``.
    """

    command: str
    checkpoints: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def figure(self, stem: str):
        """The figure ``stem``, drawn now if it was given as a callable (and kept)."""
        fig = self.figures[stem]
        if callable(fig) and not hasattr(fig, "savefig"):
            fig = self.figures[stem] = fig()
        return fig

    def to_json_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "command": self.command,
                "checkpoints": list(self.checkpoints),
                "settings": self.settings,
                "tables": {name: df for name, df in self.tables.items()},
                "summary": self.summary,
                "warnings": list(self.warnings),
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        """``json.dumps(self.to_json_dict())``; compact (``indent=None``) through :meth:`write_json`."""
        if indent is not None:
            return json.dumps(self.to_json_dict(), indent=indent, allow_nan=False)
        text = io.StringIO()
        self.write_json(text)
        return text.getvalue()

    def write_json(self, stream: TextIO) -> None:
        """Compact ``json.dumps(self.to_json_dict())`` written to ``stream`` row by row, as ``--json``
        prints it: no table is held as row dicts, nor the text as one string (28 MB for ``maps``
        on 10,000 images)."""
        head = json.dumps(to_jsonable({"command": self.command, "checkpoints": list(self.checkpoints), "settings": self.settings}), allow_nan=False)
        tail = json.dumps(to_jsonable({"summary": self.summary, "warnings": list(self.warnings)}), allow_nan=False)
        stream.write(f'{head[:-1]}, "tables": {{')
        for t, (name, df) in enumerate(self.tables.items()):
            stream.write(f'{", " if t else ""}{json.dumps(str(name))}: [')
            for i, row in enumerate(_rows(df)):
                stream.write(f'{", " if i else ""}{json.dumps(row, allow_nan=False)}')
            stream.write("]")
        stream.write(f"}}, {tail[1:]}")

    def _files(self) -> list[tuple[str, Callable[[str], Any]]]:
        """``(file name, writer(path))`` of every output file, in the order they are listed."""
        files: list[tuple[str, Callable[[str], Any]]] = []
        for name, df in self.tables.items():
            files.append((f"{name}.csv", _text(lambda df=df: df.to_csv(index=False))))
            files.append((f"{name}.md", _text(lambda df=df: df.to_markdown(index=False, floatfmt=".4g") + "\n")))
            files.append((f"{name}.tex", _text(lambda df=df: _to_latex(df))))
        files.append(("result.json", _text(lambda: self.to_json() + "\n")))
        for stem in self.figures:
            files.append((f"{stem}.png", lambda p, stem=stem: self.figure(stem).savefig(p, dpi=150, bbox_inches="tight", format="png")))
        return files

    def save(self, out_dir: str | os.PathLike, *, replace: bool = True) -> list[Path]:
        """Write every table as CSV, Markdown and LaTeX, ``result.json`` and figures as PNG.

        ``replace=True`` (analyses): ``out_dir`` appears complete in one rename, replacing an
        earlier result folder as a whole (a non-empty folder that is not a result is refused).
        ``replace=False`` (a training run folder): the files are written into the existing
        folder one by one, each atomically, beside what is there.
        """
        out = Path(out_dir)
        check_out_dir(out, replace=replace)
        files = self._files()
        if not replace:
            return [atomic_path(out / name, writer) for name, writer in files]
        parent = _parent(out)
        _remove_stale_staging(parent)
        staged: list[tuple[str, _Anonymous]] = []
        staging = parent / f".{out.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            for name, writer in files:
                staged.append((name, _Anonymous.write(parent, writer, fallback=staging / name)))
            staging.mkdir(exist_ok=True)
            for name, item in staged:
                item.link(staging / name)
            _fsync_dir(staging)
            _swap_into_place(staging, out)
        finally:
            for _, item in staged:
                item.close()
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(parent)
        return [out / name for name, _ in files]


# --- complete-or-absent files and folders ------------------------------------------------------


def _text(render: Callable[[], str]) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(render())

    return write


def _parent(path: Path) -> Path:
    parent = Path(os.path.abspath(path)).parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Anonymous:
    """A file written without a name (``O_TMPFILE``) until :meth:`link` gives it one; a process
    killed before that leaves nothing. Where the file system cannot, a named ``fallback`` file."""

    def __init__(self, fd: int | None, fallback: Path | None) -> None:
        self.fd, self.fallback = fd, fallback

    @classmethod
    def write(cls, folder: Path, writer: Callable[[str], Any], fallback: Path) -> "_Anonymous":
        fd = None
        if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
        item = cls(fd, None if fd is not None else fallback)
        try:
            if fd is None:
                fallback.parent.mkdir(exist_ok=True)
            writer(f"/proc/self/fd/{fd}" if fd is not None else str(fallback))
            if fd is not None:
                os.fsync(fd)
        except BaseException:
            item.close()
            raise
        return item

    def link(self, path: Path) -> None:
        """Give the file the name ``path`` (which must not exist); a fallback file is moved there."""
        if self.fd is None:
            if self.fallback != path:
                os.replace(self.fallback, path)
            return
        proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(str(self.fd), path, src_dir_fd=proc, follow_symlinks=True)
        finally:
            os.close(proc)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.fallback = None


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; an existing ``out`` (an earlier result) ends up at ``staging``."""
    if not out.exists():
        os.rename(staging, out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging)
        return
    old = staging.with_name(staging.name + "-old")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def _remove_stale_staging(parent: Path) -> None:
    """Remove staging folders / files left by killed processes (their pid no longer runs)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or _STAGING not in name:
            continue
        try:
            pid = int(name.rsplit(_STAGING, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_path(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` then give the file its final name ``path`` in one step.

    The file is written without a name (``O_TMPFILE``) where the file system allows, so a killed
    process leaves no temporary file; it replaces an existing ``path``.
    """
    path = Path(path)
    parent = _parent(path)
    tmp = parent / f".{path.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    item = _Anonymous.write(parent, lambda p: writer(Path(p)), fallback=tmp)
    try:
        if item.fd is not None:
            item.link(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            os.unlink(tmp)
        raise
    finally:
        item.close()
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` complete or not at all (see :func:`atomic_path`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)

    return atomic_path(path, write)


def is_result_folder(path: Path) -> bool:
    """True for a folder an earlier :meth:`AnalysisResult.save` wrote (its ``result.json`` names a command)."""
    try:
        data = json.loads((path / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "command" in data


def _probe_writable(folder: Path, what: str) -> None:
    probe = folder / f".write-test{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise MoescopeError(f"{what}: cannot write in {folder} ({exc.strerror or type(exc).__name__})") from None


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def check_out_dir(path: str | os.PathLike, *, replace: bool = True, option: str = "--out") -> None:
    """One-line errors, before any work, for an output folder that cannot be written.

    Refused: an existing file (not a folder), a folder (or its parent) that cannot be written,
    and with ``replace`` a non-empty folder that is not an earlier result (it would be replaced).
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise MoescopeError(f"{option} {path}: exists and is not a folder")
    ancestor = _existing_ancestor(path.parent if not path.is_dir() else path)
    if not ancestor.is_dir():
        raise MoescopeError(f"{option} {path}: {ancestor} is not a folder")
    if path.is_dir():
        _probe_writable(path, f"{option} {path}")
        if replace:
            _probe_writable(_existing_ancestor(path.parent), f"{option} {path}")
            try:
                has_entries = any(os.scandir(path))
            except OSError as exc:
                raise MoescopeError(f"{option} {path}: cannot list the folder ({exc.strerror})") from None
            if has_entries and not is_result_folder(path):
                raise MoescopeError(
                    f"{option} {path}: the folder holds files that are not an earlier moescope result; "
                    "give a new or empty folder (an earlier result folder is replaced as a whole)"
                )
    else:
        _probe_writable(ancestor, f"{option} {path}")


def check_out_file(path: str | os.PathLike, option: str) -> None:
    """One-line errors, before any work, for an output file that cannot be written (folder, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise MoescopeError(f"{option} {path}: is a folder, expected a file name")
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise MoescopeError(f"{option} {path}: {ancestor} is not a folder")
    _probe_writable(ancestor, f"{option} {path}")


def _to_latex(df: pd.DataFrame) -> str:
    fmt = {c: (lambda v: f"{v:.4g}") for c in df.columns if pd.api.types.is_float_dtype(df[c])}
    return df.to_latex(index=False, formatters=fmt, escape=True)
