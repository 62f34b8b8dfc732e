"""One runner per analysis: load, iterate with :mod:`moescope.forward`, feed the statistics
(:mod:`moescope.stats`), return an :class:`~moescope.results.AnalysisResult`.

- :mod:`.regions`    region routing tables (B.1 / B.2) — ``moescope regions``
- :mod:`.drift`      CKA, expert shift, routing agreement (B.12-B.14) — ``moescope cka``
- :mod:`.ablate`     expert interventions vs accuracy (B.17 / B.7) — ``moescope ablate``
- :mod:`.evaluation` verification / identification accuracy — ``moescope eval``
- :mod:`.info`       what a checkpoint holds, the registered models — ``moescope info`` / ``models``
- :mod:`.train`      the result of a training run — ``moescope train``
- :mod:`.maps`       per-expert activation maps (paper D / E) — ``moescope maps``
- :mod:`.stability`  routing stability under attacks / degradations (B.16 / B.10 / B.3) — ``moescope attack`` / ``degrade``
- :mod:`.report`     the one-page report of the whole study — ``moescope report``
"""
