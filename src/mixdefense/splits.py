"""The protocol's three disjoint splits of the evaluation data: calibration, selection, test.

* **calibration** — clean images the thresholds are set on: the validation split held out of
  training (``val``) for every shipped dataset.  A datamodule may take it from the test set
  instead (``protocol_sizes`` with a ``"calibration"`` size; ``calibration_split:
  test_calibration``); GTSRB does not, because whole physical signs make class-skewed splits
  (``datamodules/gtsrb.py``).
* **selection** — every choice between variants, settings and operating points is made here.
* **test** — reported once, at the end.

The test set is cut by :func:`protocol_splits`.  Without groups the cut is contiguous: the
selection split (and a test-set calibration split) are the *last* test images, so "the first
``n`` test images" of the test split are the first ``n`` of the whole test set.  With groups
(GTSRB: one group per physical sign, :func:`mixdefense.grouping.near_duplicate_groups`) whole
groups go to one split each, in a seeded order, so no sign spans two splits.

Sizes per dataset are the datamodules' ``protocol_sizes`` (e.g. ``{"selection": 2000}``); the
test split takes the rest.
"""

from __future__ import annotations

import hashlib

import torch

#: the splits of the test set, in the order they are taken from its end (no groups) or from the group order
TEST_SPLITS = ("calibration", "selection", "test")
#: where clean calibration images come from: the validation split held out of training (single images,
#: ``"val"``, or whole groups such as GTSRB's sign tracks, ``"val_groups"``) or the test set's calibration split
CALIBRATION_SPLITS = ("val", "val_groups", "test_calibration")


def protocol_splits(num_test: int, sizes: dict[str, int], groups: torch.Tensor | None = None,
                    seed: int = 0, strata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Disjoint, complete, sorted index sets ``{split: LongTensor}`` of a test set of ``num_test`` images.

    ``sizes`` gives the size of ``"selection"`` and optionally ``"calibration"`` (``"test"`` takes the
    rest and must keep at least half of the images).  ``groups [num_test]``: images of one group go
    to the same split (sizes are then reached or exceeded by less than one group); ``strata [num_test]``
    (e.g. the labels, constant within a group) spread each stratum's groups over the splits
    (:func:`mixdefense.grouping.group_split`).
    """
    unknown = set(sizes) - {"calibration", "selection"}
    if unknown:
        raise ValueError(f"protocol split sizes: unknown splits {sorted(unknown)} (calibration, selection; test takes the rest)")
    if any(not isinstance(v, int) or v < 0 for v in sizes.values()):
        raise ValueError(f"protocol split sizes must be non-negative integers, got {sizes}")
    taken = sum(sizes.values())
    if num_test - taken < num_test / 2:
        raise ValueError(f"the calibration and selection splits ({taken} images) must leave at least half "
                         f"of the {num_test} test images to the test split")
    if groups is None:
        out, end = {}, num_test
        for split in ("selection", "calibration"):
            n = sizes.get(split, 0)
            out[split] = torch.arange(end - n, end)
            end -= n
        out["test"] = torch.arange(0, end)
    else:
        from mixdefense.grouping import group_split

        if groups.shape != (num_test,):
            raise ValueError(f"groups must be [{num_test}], got {tuple(groups.shape)}")
        wanted = {s: sizes[s] for s in ("calibration", "selection") if sizes.get(s)}
        out = {k: v.sort().values for k, v in group_split(groups, {**wanted, "test": None}, seed, strata=strata).items()}
        if len(out["test"]) < num_test / 2:
            raise ValueError(f"the groups leave only {len(out['test'])} of {num_test} images to the test split")
    out.setdefault("calibration", torch.empty(0, dtype=torch.long))
    return {s: out[s].long() for s in TEST_SPLITS}


def indices_digest(indices: torch.Tensor) -> str:
    """sha256 of a sorted index set (how records name a split without listing it)."""
    return hashlib.sha256(indices.long().sort().values.numpy().tobytes()).hexdigest()


def calibration_test_indices(record: dict) -> torch.Tensor:
    """The test-set indices a calibration record took (empty for a validation-split calibration).

    Records: ``{"split": "val"}``; ``{"split": "test_calibration", "test_indices": [i, ...]}``;
    anything without a split (no recalibration) takes none.
    """
    if record.get("split") == "test_calibration":
        return torch.as_tensor(record["test_indices"], dtype=torch.long)
    if record.get("split") not in (None, "val", "val_groups"):
        raise ValueError(f"unknown calibration split {record.get('split')!r} in the record (recalibrate: "
                         "`mixdefense bundle --dataset ...`)")
    return torch.empty(0, dtype=torch.long)


def check_disjoint_from_calibration(record: dict, evaluated: torch.Tensor) -> None:
    """Raise ``ValueError`` if any evaluated test index (``[N]``) was a calibration image of ``record``."""
    taken = calibration_test_indices(record)
    if len(taken) and len(evaluated):
        both = torch.isin(evaluated.long(), taken)
        if both.any():
            raise ValueError(f"{int(both.sum())} evaluated test images were calibration images of the detector "
                             f"(e.g. test image {int(evaluated[both][0])}); evaluate the protocol's test split")
