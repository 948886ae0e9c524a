"""The attacker's goals and the labels each one attacks (the ``--targets`` of ``mixdefense adaptive``).

A goal (``mode``) is one of:

* ``untargeted`` — the true labels ``y``; success = any other label;
* ``random`` — one seeded uniformly random wrong label per image;
* ``topk:K`` — the ``K`` most likely wrong labels of the clean logits, attacked in turn.

Labels are ``int64`` class indices; ``y [B]``, logits ``[B, num_classes]``.
"""

from __future__ import annotations

import argparse

import torch


def target_mode(value: str) -> str:
    """``random`` | ``untargeted`` | ``topk:K`` (``K >= 1``), normalised (the type of ``--targets``)."""
    v = value.strip().lower()
    if v in ("random", "untargeted"):
        return v
    if v.startswith("topk:") and v[5:].isdigit() and int(v[5:]) >= 1:
        return f"topk:{int(v[5:])}"
    raise argparse.ArgumentTypeError(f"targets must be random, untargeted or topk:K (K >= 1), got {value!r}")


def is_targeted(mode: str) -> bool:
    """Whether the goal aims at given labels (every goal but ``untargeted``)."""
    return mode != "untargeted"


def mode_slug(mode: str) -> str:
    """``topk:3`` → ``topk3`` (file names)."""
    return mode.replace(":", "")


def wrong_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A uniformly random label ``≠ y`` per image ``[B]`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return (y + 1 + torch.randint(0, num_classes - 1, y.shape, generator=g)) % num_classes


def topk_wrong_labels(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]``: per image, the ``k`` wrong labels with the largest logits, most likely first."""
    if not 1 <= k <= logits.shape[1] - 1:
        raise ValueError(f"topk:{k} needs 1 <= K <= {logits.shape[1] - 1} (the number of wrong labels)")
    return logits.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices


def target_sets(mode: str, logits: torch.Tensor | None, y: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """The label vectors ``[B]`` a goal attacks in turn: ``[y]`` (untargeted: the true labels), one random wrong
    target, or the ``K`` most likely wrong labels of the clean ``logits``."""
    if mode == "untargeted":
        return [y]
    if mode == "random":
        return [wrong_targets(y, num_classes, seed)]
    top = topk_wrong_labels(logits, y, int(mode.split(":")[1]))
    return [top[:, i] for i in range(top.shape[1])]

