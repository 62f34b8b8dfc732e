"""Run one ``moescope`` command line in this process and report its wall time and peak RSS.

    python benchmarks/_probe.py OUT.json -- regions --data DIR --json

Writes ``OUT.json`` (``OUT.<rank>.json`` under torchrun) with ``seconds`` (the command after
imports), ``import_seconds``, ``peak_rss_mib`` (``ru_maxrss`` of this process) and ``status``.
The command's stdout is discarded.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time


def main() -> None:
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    start = time.perf_counter()
    from moescope.cli import main as cli

    import moescope.runners.drift  # noqa: F401  (imports counted apart from the command)
    import moescope.runners.regions  # noqa: F401

    imported = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli(argv)
    done = time.perf_counter()
    rank = os.environ.get("RANK")
    path = out if rank is None else out.replace(".json", f".{rank}.json")
    with open(path, "w") as f:
        json.dump({"seconds": done - imported, "import_seconds": imported - start, "status": status,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
    sys.exit(status)


if __name__ == "__main__":
    main()
