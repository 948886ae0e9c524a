"""Safe file I/O: atomic writes (write, then rename) and ``weights_only`` loading with a format tag."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch


def portable_path(path: str | Path | None) -> str | None:
    """``path`` relative to the working directory when it lies inside it (records stay free of
    machine-specific absolute paths); other paths unchanged; ``None``/empty stays ``None``."""
    if not path:
        return None
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


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


def _refusal(path: Path, err: Exception) -> str:
    """A short reason why ``torch.load(weights_only=True)`` refused ``path`` (the code it would run, if any)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    unsafe = [ln for ln in lines if "global" in ln.lower()]  # e.g. "unsupported GLOBAL posix.system"
    detail = unsafe[0] if unsafe else (lines[0] if lines else "")
    return (f"refusing to load {path}: not a plain-weights file ({err.__class__.__name__}: {detail}). "
            "MixDefense files and checkpoints load with torch.load(weights_only=True), which never runs code "
            "from a file; do not load this one with weights_only=False unless you trust where it came from")


def load_plain(path: str | Path, what: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors.

    Raises ``FileNotFoundError`` (naming ``what``) when ``path`` is missing or not a file, and
    ``ValueError`` when it is not a plain-weights file: a pickle that would run code (its
    ``__reduce__`` is never called), a truncated or corrupt file, or plain text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # pickle carrying code, truncated file, …
        raise ValueError(_refusal(path, err)) from err


def load_tagged(path: str | Path, tag: str, what: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a file written with ``{"format": tag, ...}`` using ``torch.load(weights_only=True)``.

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` when it is not a
    plain-weights file (e.g. a pickle carrying code) or carries another format tag.
    """
    payload = load_plain(path, what, map_location)
    if not isinstance(payload, dict) or payload.get("format") != tag:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a MixDefense {what} file (missing format tag {tag!r}; found {found!r})")
    return payload


F = TypeVar("F", bound=Callable[..., Any])


def refuses_malformed(what: str) -> Callable[[F], F]:
    """Decorate a ``load_*(path, ...)`` function: a payload that carries the right format tag but
    the wrong structure (a missing key, a wrong type, weights that do not fit the recorded
    configuration) becomes one ``ValueError`` naming the file, not a ``KeyError`` from deep inside."""

    def wrap(load: F) -> F:
        @functools.wraps(load)
        def checked(path, *args, **kwargs):
            try:
                return load(path, *args, **kwargs)
            except (KeyError, TypeError, RuntimeError, AttributeError, IndexError) as err:
                raise ValueError(f"{path}: malformed {what} file ({err.__class__.__name__}: {err})") from err

        return checked  # type: ignore[return-value]

    return wrap


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


def training_data(path: str | Path) -> dict:
    """The ``data`` record of a trained part's file (what it was trained on: dataset, ``val_grouping``, ...;
    :func:`lightning_modules.callbacks.training_data_record`), ``{}`` when the file has none."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        return {}
    record = payload.get("record") if isinstance(payload.get("record"), dict) else {}  # a detector layer's file
    return dict(payload.get("data") or record.get("data") or {})


def check_calibration_held_out(split: str, parts: dict[str, str | Path]) -> None:
    """Refuse to calibrate on ``split="val_groups"`` (whole held-out groups, e.g. GTSRB's sign tracks)
    when a trained part's file does not record ``data.val_grouping == "groups"``: a part trained with the
    random validation split has seen those groups' images, and thresholds set on them would be too tight
    for new objects.  ``parts``: ``{name: file}`` of the trained parts (cGAN, M, a calibrated ContraNet, which
    carries its cGAN's and M's record); other splits pass."""
    if split != "val_groups":
        return
    bad = []
    for name, path in parts.items():
        grouping = training_data(path).get("val_grouping", "not recorded")
        if grouping != "groups":
            bad.append(f"{name} {path} (val_grouping: {grouping})")
    if bad:
        raise ValueError("calibration split 'val_groups' needs parts trained with --data.init_args.val_grouping groups "
                         "(they would otherwise have trained on the calibration images): " + "; ".join(bad))
