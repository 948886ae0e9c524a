"""Resumable results: finished rows saved as JSON part files, each named by a digest of what determines it.

A killed run resumes by loading the parts it finished ("reused") instead of recomputing them; a part whose
spec changed in any field is not found and is recomputed.  Used by ``mixdefense adaptive``.
"""

from __future__ import annotations

import hashlib
import json
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
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.reused = 0
        self.computed = 0

    @staticmethod
    def digest(spec: dict) -> str:
        """sha256 (hex) of the spec's canonical JSON (sorted keys, no spaces)."""
        return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def path(self, spec: dict) -> Path:
        """``<kind>-<model>-<attack>-<goal>-<norm>-<eps>-<digest[:16]>.json`` in ``root``."""
        return self.root / (f"{spec['kind']}-{spec['model']}-{spec['attack']}-{mode_slug(spec['targets'])}-{spec['norm']}-"
                            f"{spec['eps']:.5g}-{self.digest(spec)[:16]}.json")

    def load(self, spec: dict) -> dict | None:
        """The finished part of ``spec`` (counted as reused), or ``None``: missing, unreadable or of another spec."""
        path = self.path(spec)
        if not path.exists():
            return None
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if part.get("digest") != self.digest(spec) or part.get("spec") != json.loads(json.dumps(spec)):
            return None
        self.reused += 1
        return part

    def save(self, spec: dict, part: dict) -> Path:
        """Write ``part`` (a JSON-serialisable dict) with its spec and digest, atomically; counted as computed."""
        self.computed += 1
        return atomic_write_text(self.path(spec), json.dumps({"digest": self.digest(spec), "spec": spec, **part}) + "\n")
