"""MixDefense core: plain PyTorch, no Lightning.

Layers of the defense (SAEC, ContraNet, …), the target classifiers, attacks, metrics and
plots live here.  Training loops live in ``lightning_modules``, data in ``datamodules``;
this package never imports either (``mixdefense.cli`` is the one entry point that wires
them together).
"""

__version__ = "0.1.0"

from mixdefense.validation import check_images  # noqa: E402

__all__ = ["__version__", "check_images"]
