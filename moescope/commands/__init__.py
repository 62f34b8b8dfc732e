"""CLI subcommands: each module defines ``register(subparsers)`` and ``run(args)``.

``run`` returns an :class:`~moescope.results.AnalysisResult` (printed, saved with ``--out``,
or emitted as JSON with ``--json`` by :func:`moescope.cli.emit`) or an exit status.
Modules import heavy dependencies inside ``run`` so ``moescope --help`` stays fast.
"""
