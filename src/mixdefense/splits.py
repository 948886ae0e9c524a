"""The calibration hold-out: the last test images, kept apart from the evaluated ones.

Thresholds are set on clean images the models never trained on.  The validation split
serves where it is new to the models; GTSRB's is not quite: it is drawn at random from
training sequences that hold ~30 frames of each physical sign, so its images have near
twins in the training set and score as better reconstructed than new signs do (a threshold
set there rejects more test images than its target).  The hold-out is the *last* ``n`` test
images; every evaluation takes the *first* test images, and refuses to reach the hold-out.
"""

from __future__ import annotations


def holdout_range(num_test: int, n: int | None) -> tuple[int, int]:
    """``(start, end)`` test indices of the calibration hold-out: the last ``n`` of ``num_test``.

    The hold-out must leave at least half of the test set in front of it for the evaluations.
    """
    if n is None or not 1 <= n <= num_test // 2:
        raise ValueError(f"a calibration hold-out needs 1 <= n <= half of the {num_test} test images, got {n}")
    return num_test - n, num_test


def check_disjoint_from_holdout(record: dict, num_evaluated: int) -> None:
    """Raise ``ValueError`` if the first ``num_evaluated`` test images reach a calibration hold-out.

    ``record`` is a calibration record: ``{"split": "val"}`` or
    ``{"split": "holdout", "test_indices": [start, end]}`` (anything else passes).
    """
    if record.get("split") == "holdout" and num_evaluated > record["test_indices"][0]:
        start, end = record["test_indices"]
        raise ValueError(f"the first {num_evaluated} test images overlap the calibration hold-out "
                         f"(test images {start}..{end - 1}); evaluate at most {start}")
