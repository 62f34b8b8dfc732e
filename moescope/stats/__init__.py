"""Pure statistics of routing and representations: no I/O, no model, no CLI.

- :mod:`.regions`        region x expert routing counts (B.1 / B.2) and their tables
- :mod:`.specialisation` normalised mutual information region <-> expert, per-region entropy
- :mod:`.cka`            linear CKA from the minibatch unbiased HSIC (B.12)
- :mod:`.agreement`      routing agreement of two models, routing-set IoU distance
- :mod:`.shift`          expert parameter shift (B.14), the lowest-CKA layers (B.13)
- :mod:`.usage`          the tidy expert-usage table from assignment counts

Each is tested against an independent reference implementation.
"""
