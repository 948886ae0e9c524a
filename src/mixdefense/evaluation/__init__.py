"""Evaluation: per-point metrics defined once (:mod:`.points`), the bundle sweep's summaries, tables
and report (:mod:`.sweep`), budget sweeps of one layer (:mod:`.curves`), the compared defenses
(:mod:`.baselines`), the cGAN's reconstruction report (:mod:`.reconstruction`) and figures
(:mod:`.plots`).  Import the submodule you need."""
