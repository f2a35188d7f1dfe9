"""Labelled arrays in memory as a torch Dataset: what every fine-tuning setup trains on, MedMNIST's arrays and
the user's cached volumes alike (stored integers; volumes.stored turns them into [0, 1] on the device)."""
import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """(stored image, label row, index) triples: uint8, or uint16 for the volumes setup."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index
