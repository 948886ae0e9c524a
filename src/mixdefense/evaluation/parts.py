"""Resumable results: finished rows saved as JSON part files, each named by a digest of what determines it.

A killed run resumes by loading the parts it finished ("reused") instead of recomputing them; a part whose
spec changed in any field (float fields: beyond float rounding) is not found and is recomputed.  Used by
``mixdefense adaptive``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from pathlib import Path

from mixdefense.attacks.targets import mode_slug
from mixdefense.io import atomic_write_text


class PartStore:
    """Finished rows as JSON part files in ``root``, one per spec, named by the spec's sha256 digest.

    A spec holds everything that determines a result (the attack and its settings, goal, norm, ε, the images'
    digest, the bundle's sha256, the calibration thresholds, the seed): an unchanged spec loads its part, a
    changed one finds none and recomputes.  Parts are written atomically (a temporary file, then a rename).
    It is a JSON-serialisable dict with at least ``kind``, ``model``, ``attack``, ``targets`` (a goal of
    :mod:`mixdefense.attacks.targets`), ``norm`` and ``eps`` (they make the file name readable); ``reused`` /
    ``computed`` count the parts loaded / saved.

    Float fields match to a relative :attr:`FLOAT_RTOL`: a threshold recalibrated on another machine or thread
    count differs in its last float32 bits (e.g. 0.5259537 against 0.5259538), which changes no result but would
    change the digest; such a part is found among the files of the same readable name and reused.
    """

    #: relative tolerance of float fields when a spec is matched against a part of another digest (a few float32 ulps)
    FLOAT_RTOL = 1e-6

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.reused = 0
        self.computed = 0

    @staticmethod
    def digest(spec: dict) -> str:
        """sha256 (hex) of the spec's canonical JSON (sorted keys, no spaces)."""
        return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @staticmethod
    def readable_name(spec: dict) -> str:
        """``<kind>-<model>-<attack>-<goal>-<norm>-<eps>``: the part file's name before its digest."""
        return f"{spec['kind']}-{spec['model']}-{spec['attack']}-{mode_slug(spec['targets'])}-{spec['norm']}-{spec['eps']:.5g}"

    def path(self, spec: dict) -> Path:
        """``<readable name>-<digest[:16]>.json`` in ``root``."""
        return self.root / f"{self.readable_name(spec)}-{self.digest(spec)[:16]}.json"

    def load(self, spec: dict) -> dict | None:
        """The finished part of ``spec`` (counted as reused), or ``None``: missing, unreadable or of another spec.

        First the file of ``spec``'s digest; then the files of the same readable name whose spec equals ``spec`` up to
        float rounding (:func:`specs_match`)."""
        path = self.path(spec)
        wanted = json.loads(json.dumps(spec))
        part = _read_json(path)
        if part is not None and part.get("digest") == self.digest(spec) and part.get("spec") == wanted:
            self.reused += 1
            return part
        for other in sorted(self.root.glob(glob.escape(self.readable_name(spec)) + "-*.json")):
            if other == path:
                continue
            part = _read_json(other)
            if part is not None and specs_match(part.get("spec"), wanted, self.FLOAT_RTOL):
                self.reused += 1
                return part
        return None

    def save(self, spec: dict, part: dict) -> Path:
        """Write ``part`` (a JSON-serialisable dict) with its spec and digest, atomically; counted as computed."""
        self.computed += 1
        return atomic_write_text(self.path(spec), json.dumps({"digest": self.digest(spec), "spec": spec, **part}) + "\n")


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def specs_match(a, b, rtol: float = PartStore.FLOAT_RTOL) -> bool:
    """``a == b`` for JSON values, except that two numbers of which one is a float match within relative ``rtol``
    (booleans, integers and strings must be equal; dicts need the same keys, lists the same length)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(specs_match(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(specs_match(x, y, rtol) for x, y in zip(a, b))
    numbers = (int, float)
    if (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool)
            and (isinstance(a, float) or isinstance(b, float))):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
    return type(a) is type(b) and a == b
