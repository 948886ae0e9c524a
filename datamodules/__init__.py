"""LightningDataModules for MNIST, CIFAR-10 and GTSRB (images as float tensors in [0, 1])."""

from datamodules.base import DatasetNotFoundError, ImageDataModule, ImageTensorDataset, default_data_root
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.gtsrb import GTSRBDataModule
from datamodules.mnist import MNISTDataModule

DATAMODULES = {"mnist": MNISTDataModule, "cifar10": CIFAR10DataModule, "gtsrb": GTSRBDataModule}

__all__ = [
    "CIFAR10DataModule", "DATAMODULES", "DatasetNotFoundError", "GTSRBDataModule", "ImageDataModule",
    "ImageTensorDataset", "MNISTDataModule", "default_data_root",
]
