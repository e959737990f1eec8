"""Deterministic synthetic datasets that a model can really learn. Nothing is downloaded."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset, random_split


def make_vector_classification(
    n_samples: int = 1024, n_features: int = 20, num_classes: int = 4, seed: int = 0
) -> TensorDataset:
    """Gaussian blobs: each class has its own centre; a small MLP reaches high accuracy."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, n_features, generator=generator) * 1.5
    labels = torch.randint(0, num_classes, (n_samples,), generator=generator)
    features = centres[labels] + torch.randn(n_samples, n_features, generator=generator)
    return TensorDataset(features, labels)


def make_image_classification(
    n_samples: int = 1024,
    num_classes: int = 4,
    image_size: int = 16,
    channels: int = 1,
    noise: float = 0.8,
    template_seed: int = 0,
    seed: int = 0,
) -> TensorDataset:
    """Noisy images of class templates (smooth random patterns), learnable by ``SmallCNN``.

    ``template_seed`` fixes what the classes look like; ``seed`` fixes which samples are drawn.
    Two datasets with different ``template_seed`` are two different tasks over the same kind of
    images, which is what a transfer-learning lesson needs.
    """
    template_gen = torch.Generator().manual_seed(template_seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=template_gen)
    templates = torch.nn.functional.interpolate(
        coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    sample_gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n_samples,), generator=sample_gen)
    images = templates[labels] + noise * torch.randn(
        n_samples, channels, image_size, image_size, generator=sample_gen
    )
    return TensorDataset(images, labels)


def make_loaders(
    dataset: TensorDataset, batch_size: int = 64, val_fraction: float = 0.25, seed: int = 0,
    train_loader_class: type[DataLoader] = DataLoader, num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Split ``dataset`` into shuffled train and ordered validation loaders, reproducibly.

    The train loader owns a seeded ``torch.Generator``, so its shuffle order is a function of the
    seed and of how many epochs were drawn; saving ``loader.generator.get_state()`` in a
    checkpoint restores the data order on resume. ``train_loader_class`` may be a subclass
    with the same arguments, such as torchdata's ``StatefulDataLoader`` (02 resumes mid-epoch
    with it); ``num_workers`` applies to the train loader.
    """
    n_val = int(len(dataset) * val_fraction)
    split_gen = torch.Generator().manual_seed(seed)
    train_set, val_set = random_split(dataset, [len(dataset) - n_val, n_val], generator=split_gen)
    train_loader = train_loader_class(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed + 1),
        num_workers=num_workers,
    )
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False)
    return train_loader, val_loader
