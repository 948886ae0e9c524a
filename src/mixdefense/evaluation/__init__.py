"""Evaluation: per-point metrics defined once (:mod:`.points`), budget sweeps of one layer
(:mod:`.curves`), the compared defenses (:mod:`.baselines`), the cGAN's reconstruction report
(:mod:`.reconstruction`) and figures (:mod:`.plots`).  Import the submodule you need."""
