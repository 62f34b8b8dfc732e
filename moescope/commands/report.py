"""``moescope report``: the whole study (B.1 ... E) on one static HTML page, plus report.json."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..demo import DEFAULT_PAIR
from ..errors import MoescopeError
from ..options import CHECKPOINT_HELP, split_names

DEFAULT_OUT = "moescope-report"


def register(sub: argparse._SubParsersAction) -> None:
    from ..runners.report_sections import ANALYSES

    keys = ", ".join(f"{a.key} ({a.number})" for a in ANALYSES)
    p = sub.add_parser(
        "report",
        help="run every analysis and write one self-contained HTML page + report.json (paper B.1 ... E)",
        description="Run regions, degrade, ablate, bench, cka, attack and maps on BEFORE (and AFTER), each as its own "
        "command writing OUT/NAME, and write OUT/report.html (static, no scripts, no network resources: tables, "
        "embedded figures, settings, checkpoint hashes, warnings and the exact command of every section) and "
        "OUT/report.json. An analysis that fails or does not apply becomes a note in its section. With --from, "
        "collect earlier --out folders instead of running anything. With no checkpoints: "
        f"{' '.join(DEFAULT_PAIR)} on the bundled demo. Sections: {keys}.",
    )
    p.add_argument("before", nargs="?", metavar="BEFORE", help=f"{CHECKPOINT_HELP}; default {DEFAULT_PAIR[0]} (with AFTER {DEFAULT_PAIR[1]})")
    p.add_argument("after", nargs="?", metavar="AFTER", help="a second checkpoint compared with BEFORE (e.g. fine-tuned); optional")
    p.add_argument("--data", metavar="DIR", help="face images for regions, cka and maps (default: bundled demo images)")
    p.add_argument("--split", metavar="DIR", help="evaluation split (gallery/, probe/) for ablate, attack, degrade and the maps cases (default: bundled demo split)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"folder of the page, report.json and one sub-folder per analysis (default {DEFAULT_OUT})")
    p.add_argument("--from", dest="from_dirs", nargs="+", metavar="DIR",
                   help="collect earlier analysis --out folders (or a report's --out folder) instead of running the analyses")
    p.add_argument("--only", action="append", metavar="KEYS", help="run only these sections, comma-separated keys (see above)")
    p.add_argument("--full", action="store_true", help="the commands' own defaults instead of the report's lighter settings")
    p.add_argument("--title", default="moescope report", help="page title")
    p.set_defaults(run=run, out_replace=False)  # --out holds report.html/json and one folder per analysis, each replaced as a whole


def run(args: argparse.Namespace) -> int:
    from ..cost import machine_info
    from ..report import write_report
    from ..runners.report import ANALYSES, ReportInputs, build_sections

    import torch

    only = split_names(args.only)
    unknown = sorted(set(only or ()) - {a.key for a in ANALYSES})
    if unknown:
        raise MoescopeError(f"--only: unknown section {', '.join(unknown)}; choose from {', '.join(a.key for a in ANALYSES)}")
    before, after = (args.before, args.after) if args.before is not None else DEFAULT_PAIR
    inputs = ReportInputs(before=before, after=after, data=args.data, split=args.split, full=args.full)
    start = time.perf_counter()
    run_ = build_sections(inputs, args.out, from_dirs=args.from_dirs or (), only=only,
                          log=lambda line: print(f"report: {line}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    machine = machine_info(torch.device("cpu"))
    meta = {
        "command": shlex.join(["moescope", *(getattr(args, "argv", None) or sys.argv[1:])]),
        "checkpoints": " vs ".join(c for c in (before, after) if c),
        "settings": "commands' defaults" if args.full else "lighter report settings where the analyses allow (see each section's warnings)",
        "machine": f"{machine['cpu']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads",
        "time": f"{seconds:.0f} s" if not args.from_dirs else "collected",
    }
    html_path, json_path = write_report(run_.sections, args.out, title=args.title, meta=meta)
    counts = {s: sum(x.status == s for x in run_.sections) for s in ("ok", "failed", "not applicable")}
    print(f"moescope report: {len(run_.sections)} sections ({counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['not applicable']} not applicable) in {seconds:.1f} s")
    for s in run_.sections:
        print(f"  {s.number:5} {s.title}: {s.status}" + (f" - {s.note}" if s.note else ""))
    print(f"wrote {html_path} and {json_path}")
    return 0
