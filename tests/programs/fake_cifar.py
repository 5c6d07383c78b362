"""A tiny CIFAR folder in the python-pickle release format, for the loader and end-to-end tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def fake_image(label: int, index: int) -> np.ndarray:
    """A flattened 3x32x32 uint8 image whose pixels encode its label and position in the file."""
    return np.full(3 * 32 * 32, (7 * label + index) % 256, dtype=np.uint8)


def write_cifar(root: Path, num_classes: int, per_class_per_file: int) -> Path:
    """Write ``cifar-10-batches-py`` (5 train batches + test) or ``cifar-100-python`` (train + test)
    under ``root``; every file holds ``per_class_per_file`` images of each class. Returns the folder."""
    if num_classes == 10:
        folder, train_files, test_files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        folder, train_files, test_files, key = root / "cifar-100-python", ["train"], ["test"], b"fine_labels"
    folder.mkdir(parents=True)
    for name in train_files + test_files:
        labels = [c for _ in range(per_class_per_file) for c in range(num_classes)]
        data = np.stack([fake_image(c, i) for i, c in enumerate(labels)])
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, key: labels}, fh)
    return folder
