"""The one-page report: a self-contained static HTML file (and its JSON twin) from sections.

Each :class:`Section` stands for one table or figure of the paper (``B.1`` ... ``E``): its
tables (rendered with pandas ``Styler``), its figures (matplotlib ``Figure`` objects embedded
as PNG ``data:`` URIs), the summary, settings, checkpoints (SHA-256), warnings and the exact
command lines that reproduce it — or a visible note when the analysis failed or does not
apply. The page has no JavaScript and references no external resource (a Content Security
Policy forbids any), so it opens offline and can be mailed or archived as one file.

    sections = [section_from_result(result, "B.1", "Expert usage by facial region",
                                    commands=["moescope regions demo:after"])]
    html_path, json_path = write_report(sections, "report/")
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from facemoe_model.fileio import atomic_write

from .results import AnalysisResult, to_jsonable

__all__ = [
    "Section",
    "NotApplicable",
    "section_from_result",
    "failed_section",
    "run_section",
    "checkpoint_hashes",
    "build_report",
    "report_dict",
    "write_report",
]

STATUSES = ("ok", "failed", "not applicable")
MAX_TABLE_ROWS = 200
"""Rows shown per table on the page; the JSON twin always holds the whole table."""
COLLAPSE_ROWS = 24
"""Tables longer than this are folded (``<details>``): the summary line shows their caption and size."""


class NotApplicable(Exception):
    """Raised by a section's analysis when it does not apply (e.g. ablate without identity data)."""


@dataclass
class Section:
    """One section of the report (one paper table or figure).

    Attributes:
        number: the paper's number (``B.1`` ... ``E``).
        title: what the section shows.
        tables: DataFrames by caption.
        figures: matplotlib Figures (or PNG bytes) by caption.
        summary / settings: headline numbers; every option that determined the result.
        checkpoints: checkpoint -> SHA-256 of its file (or why there is none).
        warnings: caveats shown on the page.
        commands: the exact command lines that reproduce the section.
        status: ``ok``, ``failed`` or ``not applicable``.
        note: the visible message of a failed / not-applicable section.
        description: one paragraph of prose.
        id: the HTML id (default: derived from number and title).
    """

    number: str
    title: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    status: str = "ok"
    note: str | None = None
    description: str = ""
    id: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown section status {self.status!r}; use one of {', '.join(STATUSES)}")
        if self.id is None:
            self.id = _slug(f"{self.number} {self.title}")


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower().replace(".", "")).strip("-")
    return slug or "section"


def _unique_ids(sections: Sequence[Section]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for s in sections:
        base = s.id or _slug(f"{s.number} {s.title}")
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.append(base if n == 0 else f"{base}-{n + 1}")
    return ids


# -- building sections -------------------------------------------------------------------------
def checkpoint_hashes(specs: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each checkpoint file (``demo:NAME`` resolved); a short reason when it is not a file."""
    from .demo import resolve_checkpoint

    out = {}
    for spec in specs:
        try:
            path = resolve_checkpoint(spec) if str(spec).startswith("demo:") else Path(spec)
        except Exception as exc:  # an unknown demo name: say so rather than fail the report
            out[str(spec)] = f"unresolved: {exc}"
            continue
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            out[str(spec)] = f"sha256:{digest.hexdigest()}"
        else:
            out[str(spec)] = "no file (model name or random weights)"
    return out


def section_from_result(
    result: AnalysisResult,
    number: str,
    title: str,
    *,
    commands: Sequence[str] = (),
    description: str = "",
    hashes: Mapping[str, str] | None = None,
    id: str | None = None,
) -> Section:
    """A section showing an :class:`AnalysisResult` (checkpoints hashed unless ``hashes`` given)."""
    return Section(
        number=number, title=title, tables=dict(result.tables), figures=dict(result.figures),
        summary=dict(result.summary), settings={"command": result.command, **result.settings},
        checkpoints=dict(hashes) if hashes is not None else checkpoint_hashes(result.checkpoints),
        warnings=list(result.warnings), commands=list(commands), description=description, id=id,
    )


def failed_section(number: str, title: str, message: str, *, status: str = "failed",
                   commands: Sequence[str] = (), description: str = "", id: str | None = None) -> Section:
    """A section whose analysis failed (or, with ``status="not applicable"``, does not apply)."""
    return Section(number=number, title=title, status=status, note=message, commands=list(commands),
                   description=description, id=id)


def run_section(number: str, title: str, analysis: Callable[[], AnalysisResult], *,
                commands: Sequence[str] = (), description: str = "", id: str | None = None) -> Section:
    """Run ``analysis()`` into a section; an exception becomes a visible note instead of a crash
    (:class:`NotApplicable` -> ``not applicable``, anything else -> ``failed``)."""
    try:
        result = analysis()
    except NotApplicable as exc:
        return failed_section(number, title, str(exc) or "does not apply", status="not applicable",
                              commands=commands, description=description, id=id)
    except Exception as exc:  # noqa: BLE001 - the report shows the failure and goes on
        return failed_section(number, title, f"{type(exc).__name__}: {exc}", commands=commands,
                              description=description, id=id)
    return section_from_result(result, number, title, commands=commands, description=description, id=id)


# -- rendering ---------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d232a;background:#fff;line-height:1.45}
header{background:#1f3b57;color:#fff;padding:1.2em 2em}
header h1{margin:0 0 .3em 0;font-size:1.6em}
header .meta{margin:0;font-size:.9em;opacity:.9}
nav{padding:1em 2em;border-bottom:1px solid #d5dbe1;background:#f5f7f9}
nav ol{margin:0;padding-left:1.4em;columns:2}
nav a{color:#1f3b57}
main{padding:0 2em 2em 2em;max-width:1200px}
section{border-bottom:1px solid #d5dbe1;padding:1em 0 1.5em 0}
h2{font-size:1.3em;margin:.6em 0 .4em 0}
h2 .number{display:inline-block;min-width:3.2em;color:#1f3b57}
h3{font-size:1em;margin:1.1em 0 .3em 0;color:#3c4a57}
.badge{font-size:.7em;padding:.15em .5em;border-radius:.6em;vertical-align:middle;margin-left:.6em}
.badge.ok{background:#d8f0dc;color:#1b5e20}.badge.failed{background:#fbd9d6;color:#8e1b10}
.badge.not-applicable{background:#eceff1;color:#455a64}
.note{padding:.7em 1em;border-left:4px solid #c62828;background:#fdecea}
.note.not-applicable{border-color:#78909c;background:#eceff1}
.warnings li{color:#8a5300}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85em;margin:.3em 0}
th,td{border:1px solid #d5dbe1;padding:.2em .55em;text-align:right}
th{background:#eef2f5}
td.key,th.key{text-align:left}
details{margin:.3em 0}details summary{cursor:pointer;font-weight:600;font-size:.9em;color:#1f3b57}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2em 0}
figure{margin:.6em 0}
figure img{max-width:100%;height:auto;border:1px solid #eef2f5}
figcaption{font-size:.85em;color:#3c4a57}
pre{background:#f5f7f9;padding:.6em 1em;overflow-x:auto;font-size:.85em}
.truncated{font-size:.8em;color:#5f6b76}
footer{padding:1em 2em;font-size:.8em;color:#5f6b76}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _value_text(value: Any) -> str:
    value = to_jsonable(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, allow_nan=False, default=str)
    return "" if value is None else str(value)


def _folded(text: str, limit: int = 160) -> str:
    """Escaped ``text``; a long value (nested tables in a summary) folds behind its first characters."""
    if len(text) <= limit:
        return _esc(text)
    return f"<details><summary>{_esc(text[:limit])} …</summary>{_esc(text)}</details>"


def _key_value_table(items: Mapping[str, Any], css: str) -> str:
    rows = "".join(f'<tr><th class="key">{_esc(k)}</th><td class="key">{_folded(_value_text(v))}</td></tr>' for k, v in items.items())
    return f'<div class="scroll"><table class="{css}">{rows}</table></div>'


def _table_html(df: pd.DataFrame, caption: str, uuid: str, max_rows: int) -> str:
    shown = df.head(max_rows)
    styler = (
        shown.style.format(precision=4, escape="html", na_rep="—", thousands=None)
        .format_index(escape="html", axis=1)
        .hide(axis="index")
        .set_uuid(uuid)
        .set_caption(html.escape(caption))
        .set_table_attributes('class="data"')
    )
    text_columns = [c for c in shown.columns if not pd.api.types.is_numeric_dtype(shown[c])]
    if text_columns:
        styler = styler.set_properties(subset=text_columns, **{"text-align": "left"})
    out = f'<div class="scroll">{styler.to_html()}</div>'
    if len(df) > max_rows:
        out += f'<p class="truncated">showing the first {max_rows} of {len(df)} rows; report.json holds them all</p>'
    if len(df) > COLLAPSE_ROWS:  # long tidy tables fold away (HTML <details>, no script) so the page stays readable
        out = f'<details><summary>{html.escape(caption)} ({len(df)} rows)</summary>{out}</details>'
    return out


def _png_data_uri(figure: Any, dpi: int) -> str:
    if isinstance(figure, (bytes, bytearray)):
        data = bytes(figure)
    else:
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        data = buf.getvalue()
    if not data.startswith(b"\x89PNG"):
        raise ValueError("figure bytes are not a PNG image")
    return "data:image/png;base64," + base64.b64encode(_without_text_chunks(data)).decode("ascii")


def _without_text_chunks(png: bytes) -> bytes:
    """The PNG without its text metadata chunks (tEXt/zTXt/iTXt: e.g. matplotlib's URL), pixels untouched."""
    out, pos = [png[:8]], 8
    while pos + 8 <= len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        end = pos + 12 + length
        if png[pos + 4:pos + 8] not in (b"tEXt", b"zTXt", b"iTXt"):
            out.append(png[pos:end])
        pos = end
    return b"".join(out)


def _section_html(s: Section, sid: str, max_rows: int, dpi: int) -> str:
    status_cls = s.status.replace(" ", "-")
    parts = [
        f'<section id="{_esc(sid)}" class="status-{status_cls}">',
        f'<h2><span class="number">{_esc(s.number)}</span> {_esc(s.title)}'
        f'<span class="badge {status_cls}">{_esc(s.status)}</span></h2>',
    ]
    if s.description:
        parts.append(f'<p class="description">{_esc(s.description)}</p>')
    if s.note:
        label = "Analysis failed" if s.status == "failed" else ("Does not apply" if s.status == "not applicable" else "Note")
        parts.append(f'<p class="note {status_cls}"><strong>{label}:</strong> {_esc(s.note)}</p>')
    if s.summary:
        parts += ["<h3>Summary</h3>", _key_value_table(s.summary, "summary")]
    for i, (name, fig) in enumerate(s.figures.items()):
        if i == 0:
            parts.append("<h3>Figures</h3>")
        parts.append(f'<figure><img src="{_png_data_uri(fig, dpi)}" alt="{_esc(name)}"><figcaption>{_esc(name)}</figcaption></figure>')
    for i, (name, df) in enumerate(s.tables.items()):
        if i == 0:
            parts.append("<h3>Tables</h3>")
        parts.append(_table_html(df, name, f"{sid}-t{i}", max_rows))
    if s.warnings:
        parts += ["<h3>Warnings</h3>", '<ul class="warnings">', *[f"<li>{_esc(w)}</li>" for w in s.warnings], "</ul>"]
    if s.settings:
        parts += ["<h3>Settings</h3>", _key_value_table(s.settings, "settings")]
    if s.checkpoints:
        parts += ["<h3>Checkpoints</h3>", _key_value_table(s.checkpoints, "checkpoints")]
    if s.commands:
        parts += ["<h3>Reproduce</h3>", "<pre><code>" + "\n".join(_esc(c) for c in s.commands) + "</code></pre>"]
    parts.append("</section>")
    return "\n".join(parts)


def build_report(sections: Sequence[Section], *, title: str = "moescope report", meta: Mapping[str, Any] | None = None,
                 max_rows: int = MAX_TABLE_ROWS, dpi: int = 110) -> str:
    """The report as one self-contained HTML page (no JavaScript, no external resource).

    ``meta`` (e.g. moescope version, the report command, machine) is shown under the title.
    """
    ids = _unique_ids(sections)
    meta_html = " · ".join(f"{_esc(k)}: {_esc(_value_text(v))}" for k, v in (meta or {}).items())
    toc = "".join(
        f'<li><a href="#{_esc(sid)}">{_esc(s.number)} {_esc(s.title)}</a>'
        + ("" if s.status == "ok" else f" ({_esc(s.status)})") + "</li>"
        for s, sid in zip(sections, ids)
    )
    body = "\n".join(_section_html(s, sid, max_rows, dpi) for s, sid in zip(sections, ids))
    from . import __version__

    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>{_esc(title)}</h1><p class="meta">{meta_html}</p></header>\n'
        f"<nav><ol>{toc}</ol></nav>\n<main>\n{body}\n</main>\n"
        f"<footer>moescope {_esc(__version__)} · {len(sections)} sections · static page, no scripts, no network resources</footer>\n"
        "</body>\n</html>\n"
    )


def report_dict(sections: Sequence[Section], *, title: str = "moescope report", meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The same content as :func:`build_report` as plain JSON types (whole tables; figure captions)."""
    ids = _unique_ids(sections)
    return to_jsonable({
        "title": title,
        "meta": dict(meta or {}),
        "sections": [
            {
                "id": sid, "number": s.number, "title": s.title, "status": s.status, "note": s.note,
                "description": s.description, "summary": s.summary, "tables": dict(s.tables),
                "figures": list(s.figures), "warnings": list(s.warnings), "settings": s.settings,
                "checkpoints": s.checkpoints, "commands": list(s.commands),
            }
            for s, sid in zip(sections, ids)
        ],
    })


def write_report(sections: Sequence[Section], out_dir: str | Path, *, title: str = "moescope report",
                 meta: Mapping[str, Any] | None = None, name: str = "report") -> tuple[Path, Path]:
    """Write ``NAME.html`` and ``NAME.json`` into ``out_dir`` atomically; returns both paths."""
    out = Path(out_dir)
    page = build_report(sections, title=title, meta=meta)
    data = json.dumps(report_dict(sections, title=title, meta=meta), indent=2, allow_nan=False, default=str) + "\n"
    return atomic_write(out / f"{name}.html", page), atomic_write(out / f"{name}.json", data)
