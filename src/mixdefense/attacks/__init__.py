"""Attacks: the registry of standard attacks (:mod:`.registry`, entry point :func:`run_attack`)
and the adaptive attacks on the whole pipeline (:mod:`.adaptive`, imported on use).

Budgets are in ``[0, 1]`` pixel units: L∞ per pixel, L2 over the whole image.
"""

from mixdefense.attacks.minimum_norm import CarliniWagnerL2, Restarts
from mixdefense.attacks.registry import (
    ATTACKS,
    AttackSpec,
    BatchedDeepFool,
    ChannelsLast,
    fgm_sweep,
    fgsm_sweep,
    get_attack,
    perturbation_norm,
    run_attack,
    run_sweep,
)

__all__ = ["ATTACKS", "AttackSpec", "BatchedDeepFool", "CarliniWagnerL2", "ChannelsLast", "Restarts", "fgm_sweep", "fgsm_sweep",
           "get_attack", "perturbation_norm", "run_attack", "run_sweep"]
