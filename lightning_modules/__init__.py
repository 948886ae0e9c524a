"""LightningModules over the plain-PyTorch core in :mod:`mixdefense`."""

from lightning_modules.callbacks import ExportCGAN, ExportClassifier, WallClock
from lightning_modules.cgan import CGANModule
from lightning_modules.classifier import ClassifierModule

__all__ = ["CGANModule", "ClassifierModule", "ExportCGAN", "ExportClassifier", "WallClock"]
