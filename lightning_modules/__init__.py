"""LightningModules over the plain-PyTorch core in :mod:`mixdefense`."""

from lightning_modules.callbacks import ExportAutoencoder, ExportCGAN, ExportClassifier, ExportMetric, WallClock
from lightning_modules.cgan import CGANModule
from lightning_modules.classifier import ClassifierModule
from lightning_modules.evaluation import MixDefenseEvaluation
from lightning_modules.magnet import AutoencoderModule
from lightning_modules.metric import MetricModule

__all__ = ["AutoencoderModule", "CGANModule", "ClassifierModule", "ExportAutoencoder", "ExportCGAN", "ExportClassifier", "ExportMetric",
           "MetricModule", "MixDefenseEvaluation", "WallClock"]
