"""CLI subcommands: each module defines ``register(subparsers)``, ``run(args)`` and ``render(result)``.

``register`` declares the command's options (the shared ones through :mod:`moescope.options`);
``run`` resolves them, calls the analysis's runner (:mod:`moescope.runners`) and shows the
:class:`~moescope.results.AnalysisResult` with :func:`moescope.cli.emit` (text from
``render``, ``--json``, ``--out``); ``render`` is the human-readable text. Modules import
heavy dependencies inside ``run`` so ``moescope --help`` stays fast. The command list is
:data:`moescope.cli.COMMANDS`.
"""
