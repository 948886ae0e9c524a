"""Evaluation: per-point metrics defined once (:mod:`.points`), the bundle sweep's summaries, tables
and report (:mod:`.sweep`), budget sweeps of one layer (:mod:`.curves`), the compared defenses
(:mod:`.baselines`), the cGAN's reconstruction report (:mod:`.reconstruction`), figures
(:mod:`.plots`), the adaptive study's robust-accuracy table (:mod:`.robust`), the paper's §6 case
studies (:mod:`.case_studies`) and resumable result parts (:mod:`.parts`).  Import the submodule you need."""
