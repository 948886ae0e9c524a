"""MixDefense core: plain PyTorch, no Lightning.

Layers of the defense (SAEC, ContraNet, …), the target classifiers, attacks, metrics and
plots live here.  Training loops live in ``lightning_modules``, data in ``datamodules``;
this package never imports either (``mixdefense.cli`` is the one entry point that wires
them together).
"""

__version__ = "0.1.0"

from mixdefense.validation import check_images  # noqa: E402

__all__ = ["MixDefense", "__version__", "check_images", "load_detector", "save_bundle"]

_LAZY = {"MixDefense": "mixdefense.pipeline", "load_detector": "mixdefense.pipeline", "save_bundle": "mixdefense.pipeline"}


def __getattr__(name: str):
    """``mixdefense.load_detector`` etc., imported on first use (the CLI starts without them)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixdefense' has no attribute {name!r}")
