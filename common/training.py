"""A tiny train/evaluate pair that every lesson shares, and the checkpoint key set."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common.data import make_image_classification, make_loaders
from common.models import SmallCNN

#: The one checkpoint vocabulary of the collection (see the ``common`` package docstring).
#: ``epoch`` is the NEXT epoch to run, so a resume never repeats or skips one.
CHECKPOINT_KEYS = (
    "model", "optimizer", "scheduler", "scaler", "epoch", "step", "metrics", "history", "rng",
    "config", "data",
)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Run one epoch of cross-entropy training; return the mean training loss.

    ``scheduler`` (optional) is stepped once per epoch, after the optimizer steps.
    ``scaler`` (optional, an enabled ``torch.amp.GradScaler``) turns on mixed precision:
    the forward pass runs under ``torch.autocast`` and the loss is scaled against fp16 underflow.
    """
    model.train()
    device_type = torch.device(device).type
    use_amp = scaler is not None and scaler.is_enabled()
    total, count = 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, enabled=use_amp):
            loss = F.cross_entropy(model(inputs), targets)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.item() * len(targets)
        count += len(targets)
    if scheduler is not None:
        scheduler.step()
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str) -> dict[str, float]:
    """Return ``{"loss": mean cross-entropy, "accuracy": fraction correct}`` in eval mode."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        count += len(targets)
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device | str,
    *,
    epochs: int,
    lr: float = 3e-3,
) -> dict[str, float]:
    """Train ``model`` with Adam for ``epochs``; return the final ``evaluate`` figures.

    For lessons that only need *a* trained model to save, export or compare.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        train_one_epoch(model, train_loader, optimizer, device)
    return evaluate(model, val_loader, device)


def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """Every random generator a training step draws from, under the collection's ``rng`` keys.

    ``python`` (``random``), ``numpy`` (its global generator, as plain ints so the checkpoint
    loads with ``weights_only=True``), ``torch`` (the CPU generator), ``cuda`` (one state per
    CUDA device, when CUDA is present: Dropout on a GPU draws from these) and ``loader`` (the
    DataLoader's own generator, which decides the shuffle order). 02 teaches this; lessons
    that only need it call this copy.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def restore_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    """Undo :func:`capture_rng_state`: set every generator back to the saved state."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"].cpu())


def train_demo_model(
    device: torch.device | str, seed: int, epochs: int = 2
) -> tuple[SmallCNN, tuple[DataLoader, DataLoader], float]:
    """"A trained toy model" in one call: SmallCNN on 768 synthetic images for ``epochs``.

    Returns ``(model, (train_loader, val_loader), validation accuracy)``; the model is on
    ``device``. For lessons whose subject is what happens to trained weights, not training.
    """
    loaders = make_loaders(make_image_classification(768, seed=seed), seed=seed)
    model = SmallCNN().to(device)
    accuracy = fit(model, *loaders, device, epochs=epochs, lr=3e-3)["accuracy"]
    return model, loaders, accuracy
