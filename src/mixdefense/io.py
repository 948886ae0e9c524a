"""Safe file I/O: atomic writes (write, then rename) and ``weights_only`` loading with a format tag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def atomic_torch_save(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_tagged(path: str | Path, tag: str, what: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a file written with ``{"format": tag, ...}`` using ``torch.load(weights_only=True)``.

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` when it is not a
    plain-weights file (e.g. a pickle carrying code) or carries another format tag.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle carrying code, truncated file, …
        raise ValueError(f"refusing to load {path}: not a plain-weights file ({err.__class__.__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ValueError(f"{path} is not a MixDefense {what} file (missing format tag {tag!r})")
    return payload


def configured_payload(module: torch.nn.Module) -> dict[str, Any]:
    """``{"config", "state_dict"}`` of a module that records its constructor settings in ``.config``."""
    return {"config": module.config, "state_dict": module.state_dict()}


def build_configured(cls: type, entry: dict[str, Any]) -> torch.nn.Module:
    """Rebuild ``cls(**entry["config"])`` with ``entry["state_dict"]``, in eval mode."""
    module = cls(**entry["config"])
    module.load_state_dict(entry["state_dict"])
    return module.eval()


def save_configured(module: torch.nn.Module, path: str | Path, tag: str, **record: Any) -> Path:
    """Write a configured module (see :func:`configured_payload`) as a tagged plain-weights file."""
    return atomic_torch_save({"format": tag, **configured_payload(module), **record}, path)


def load_configured(cls: type, path: str | Path, tag: str, what: str, map_location: str | torch.device = "cpu"):
    """Load :func:`save_configured`'s file (``weights_only=True``) back into ``cls``, in eval mode."""
    return build_configured(cls, load_tagged(path, tag, what, map_location))
