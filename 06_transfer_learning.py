"""06 · Transfer learning — load what fits, freeze what works, save what changed.

What you will learn (each section runs real code and prints the measured figure):
  1. A "pretrained" backbone you can trust offline (and torchvision's real weights, on a flag)
  2. Loading into a changed architecture: strict=False, missing/unexpected keys, shape
     mismatches, renamed keys, and a helper that loads what fits and reports the rest
  3. Freezing: requires_grad_(False), frozen BatchNorm kept in eval(), an optimizer over the
     trainable parameters only
  4. Gradual unfreezing with discriminative learning rates, and a checkpoint at the phase
     change that holds the phase and every random generator
  4b. Resuming across the phase change: the optimizer layout must match, then it is exact
  5. Saving fine-tuned models: the full state_dict vs only what changed, and rebuilding
  6. The feature-extractor pattern: create_feature_extractor, saved features
  6b. Training a new head on the saved features alone
  7. Measured transfer: target accuracy of transfer vs training from scratch, same data
     and epochs, each with its own learning rate, over 3 seeds
  7b. The learning curves, with the spread over seeds

Run it:   python 06_transfer_learning.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          [--torchvision-weights]   also load ResNet18_Weights.DEFAULT (downloads ~45 MB
                                    into torch's hub cache unless it is already there)
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 9 s on a 2-core CPU.
Next:     07_distributed_training.py, checkpoints under DDP and FSDP2.

Files it writes (in --out-dir): pretrained_source.pt (the "downloaded" backbone),
finetune_checkpoint_epoch002.pt (the phase-1 checkpoint), saved/ (full and delta files of
section 5), finetuned_model.pt, target_features.pt, transfer_vs_scratch.png and
summary.json.

The reusable pieces (load_what_fits with its LoadReport, state_dict_delta, and the guarded
torchvision loader) work with any model: nothing in them knows SmallCNN.
"""

from __future__ import annotations

import copy
import dataclasses
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from common.compare import max_abs_diff
from common.data import make_image_classification, make_loaders
from common.devices import deterministic_kernels, seed_everything
from common.models import SmallCNN
from common.run import Run, format_bytes, in_notebook, make_parser, script_file
from common.training import (
    capture_rng_state,
    evaluate,
    fit,
    restore_rng_state,
    train_one_epoch,
)

matplotlib.use("Agg")  # write PNG files, never open a window
HERE = script_file(globals(), "06_transfer_learning.py")  # a notebook kernel has no __file__

SOURCE_CLASSES, TARGET_CLASSES = 16, 4
TARGET_TRAIN, TARGET_VAL = 96, 400  # a small target set: where transfer pays off
EPOCHS, UNFREEZE_AT = 5, 2  # the target budget; the backbone unfreezes after epoch 2
HEAD_LR, BACKBONE_LR = 3e-2, 1e-3  # discriminative learning rates
BATCH_SIZE = 8
SEEDS, SCRATCH_LRS = 3, (1e-3, 3e-3, 1e-2)  # section 7: seeds, and the scratch LR sweep

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


@dataclasses.dataclass
class LoadReport:
    """What ``load_what_fits`` did with each key.

    Print it, or log it: a transfer that silently skipped the backbone (renamed keys) looks
    exactly like one that loaded it, until the accuracy says otherwise.
    """

    loaded: list[str]
    skipped_shape: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)
    missing: list[str]  # in the model, absent from the checkpoint: left as initialised
    unexpected: list[str]  # in the checkpoint, absent from the model: ignored

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        lines += [f"skipped for shape: {k} {a} -> model {b}" for k, a, b in self.skipped_shape]
        if self.missing:
            lines.append(f"missing (kept their init): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def load_what_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                   rename: Callable[[str], str] | None = None) -> LoadReport:
    """Load every tensor whose (renamed) key exists in ``model`` with the same shape.

    ``load_state_dict(strict=False)`` alone forgives missing and unexpected keys but still
    raises on a shape mismatch; this filters those out first and reports everything.
    ``rename`` maps a checkpoint key to the model's name for it (another codebase's
    "features.0.weight" for our "backbone.0.weight"); it runs before the matching.
    """
    own = model.state_dict()
    renamed = {(rename(k) if rename else k): v for k, v in state_dict.items()}
    fitting = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    result = model.load_state_dict(fitting, strict=False)
    return LoadReport(
        loaded=sorted(fitting),
        skipped_shape=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in renamed.items()
                       if k in own and own[k].shape != v.shape],
        missing=[k for k in result.missing_keys if k not in renamed],
        unexpected=[k for k in renamed if k not in own],
    )


def state_dict_delta(finetuned: Mapping[str, torch.Tensor],
                     base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``finetuned`` that differ from ``base`` (or that ``base`` lacks).

    Parameters AND buffers are compared: BatchNorm statistics that moved belong to the delta.
    Comparison is exact (torch.equal), so a delta holds only tensors that really changed;
    rebuilding is "load the base, then load the delta with strict=False".
    """
    return {k: v for k, v in finetuned.items()
            if k not in base or v.shape != base[k].shape or not torch.equal(v, base[k].to(v))}


def torchvision_resnet18(num_classes: int):
    """ResNet-18 with ImageNet weights, re-headed for ``num_classes``; ``(model, message)``.

    ``resnet18(weights=ResNet18_Weights.DEFAULT)`` loads from torch's hub cache
    (``torch.hub.get_dir()``), downloading once if needed. Without network or cache it fails;
    we turn that into one clear message instead of a traceback. The socket timeout bounds a
    download that cannot connect; the cache path in the message is where to copy the file
    on a machine without network.
    """
    from torchvision.models import ResNet18_Weights, resnet18

    weights = ResNet18_Weights.DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a download that cannot connect fails instead of hanging
    try:
        pretrained = resnet18(weights=weights, progress=False)
    except Exception as err:  # URLError, HTTPError, OSError, a truncated cache file...
        where = "found in" if cached.exists() else "not in"
        return None, (f"could not load {weights} ({where} the cache at {cached}; "
                      f"{type(err).__name__}: {err}); without network, copy the file there")
    finally:
        socket.setdefaulttimeout(previous_timeout)
    model = resnet18(num_classes=num_classes)
    report = load_what_fits(model, pretrained.state_dict())
    return model, f"loaded {weights} from {cached}: {report.skipped_shape} re-initialised"


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 06_transfer_learning.py` runs them all through main() at the bottom.
# ############################################################################################

# The lessons' fine-tuning model and loop. FineTunableCNN is the pattern to copy for any model
# with a backbone: freezing must reach BatchNorm's train/eval switch, not only requires_grad.


class FineTunableCNN(SmallCNN):
    """SmallCNN whose backbone can be frozen, BatchNorm included.

    requires_grad_(False) stops gradients, but BatchNorm in train mode still updates its
    running statistics on every forward pass, so a "frozen" backbone drifts. ``train()`` here
    keeps a frozen backbone in eval mode (the "norm_eval" pattern of detection libraries).
    """

    def __init__(self, num_classes: int = TARGET_CLASSES) -> None:
        super().__init__(num_classes=num_classes)
        self.backbone_frozen = False

    def freeze_backbone(self, frozen: bool = True) -> None:
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> FineTunableCNN:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def build_optimizer(model: FineTunableCNN, phase: int) -> torch.optim.Optimizer:
    """The optimizer for a fine-tuning phase: 1 = head only, 2 = head + backbone.

    Discriminative learning rates: the new head learns fast (HEAD_LR); the pretrained backbone
    moves slowly (BACKBONE_LR) so it adapts without forgetting. Named groups show the layout.
    The phase decides the number of param groups, and so which optimizer state_dicts fit.
    """
    groups = [{"params": list(model.head.parameters()), "lr": HEAD_LR, "name": "head"}]
    if phase == 2:
        groups.append({"params": list(model.backbone.parameters()), "lr": BACKBONE_LR,
                       "name": "backbone"})
    return torch.optim.Adam(groups)


def fine_tune(model: FineTunableCNN, loaders, device: torch.device, *, start_epoch: int = 0,
              optimizer: torch.optim.Optimizer | None = None, stop_after: int | None = None,
              on_epoch_end: Callable[[int, torch.optim.Optimizer], None] | None = None):
    """Gradual unfreezing: head only for UNFREEZE_AT epochs, then head + backbone.

    Returns (optimizer, validation accuracy per epoch run). Given ``start_epoch`` and the
    optimizer rebuilt for that epoch's phase, it continues a run exactly where it stopped,
    unfreezing at the same epoch as an uninterrupted run; ``on_epoch_end(epoch, optimizer)``
    is where a checkpoint gets written.
    """
    train_loader, val_loader = loaders
    if optimizer is None:
        phase = 1 if start_epoch < UNFREEZE_AT else 2
        model.freeze_backbone(phase == 1)
        optimizer = build_optimizer(model, phase)
    accuracies = []
    for epoch in range(start_epoch, stop_after or EPOCHS):
        if epoch == UNFREEZE_AT:  # phase 2: unfreeze, and give the backbone its own group
            model.freeze_backbone(False)
            optimizer.add_param_group({"params": list(model.backbone.parameters()),
                                       "lr": BACKBONE_LR, "name": "backbone"})
        train_one_epoch(model, train_loader, optimizer, device)
        accuracies.append(evaluate(model, val_loader, device)["accuracy"])
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, optimizer)
    return optimizer, accuracies


class RenamedCNN(nn.Module):
    """The same layers as SmallCNN under other names (features/classifier), as in another
    codebase. Warm-start it by renaming keys: backbone.* -> features.*."""

    def __init__(self, num_classes: int = TARGET_CLASSES) -> None:
        super().__init__()
        reference = SmallCNN(num_classes=num_classes)
        self.features, self.classifier = reference.backbone, reference.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# %% Setup
# The flags and the TARGET task: 4 classes with other templates than the source task, 96
# training images and 400 validation images, in batches of 8. In a notebook the flags come
# from the LESSON_ARGS environment variable (none: the defaults).


def setup(argv: list[str] | None = None) -> tuple[Run, tuple]:
    """Parse the flags, start the run, build the target task's loaders."""
    parser = make_parser(HERE, __doc__.splitlines()[0])
    parser.add_argument("--torchvision-weights", action="store_true",
                        help="also load torchvision's ResNet18_Weights.DEFAULT (network or "
                             "cache needed; without them a clear message, then the rest runs)")
    run = Run.start(HERE, parser, argv)
    target = make_image_classification(TARGET_TRAIN + TARGET_VAL, num_classes=TARGET_CLASSES,
                                       template_seed=7, noise=1.5, seed=run.seed + 2)
    loaders = make_loaders(target, batch_size=BATCH_SIZE, seed=run.seed + 2,
                           val_fraction=TARGET_VAL / (TARGET_TRAIN + TARGET_VAL))
    return run, loaders


if in_notebook():
    run, loaders = setup()


# %% 1. A pretrained backbone, honestly offline
# Transfer learning reuses features learned on a big SOURCE task for a small TARGET task. To
# stay offline and measurable, we pretrain ourselves: SmallCNN on a 16-class synthetic source
# task (seconds), saved as a plain state_dict, exactly like a downloaded checkpoint. The target
# task has 4 different classes and only 96 training images. With --torchvision-weights the
# script also loads real ImageNet weights the torchvision way:
#     from torchvision.models import resnet18, ResNet18_Weights
#     model = resnet18(weights=ResNet18_Weights.DEFAULT)   # cached in torch.hub.get_dir()


def lesson_1_pretrain(run: Run, use_torchvision: bool) -> tuple[Path, dict]:
    """Pretrain SmallCNN on the 16-class source task and save it like a download.

    From here on the lessons only ever read pretrained_source.pt, as they would a file from
    a model hub: nothing else of the pretraining run is kept.
    """
    run.section("1. A pretrained backbone, honestly offline")
    seed_everything(run.seed)
    source = make_loaders(make_image_classification(
        3072, num_classes=SOURCE_CLASSES, template_seed=100, noise=1.0, seed=run.seed + 1),
        seed=run.seed + 1)
    pretrained = SmallCNN(num_classes=SOURCE_CLASSES).to(run.device)
    source_accuracy = fit(pretrained, *source, run.device, epochs=6)["accuracy"]
    path = run.path("pretrained_source.pt")
    torch.save(pretrained.state_dict(), path)
    print(f"  pretrained on the source task ({SOURCE_CLASSES} classes): validation accuracy "
          f"{source_accuracy:.3f}")
    run.artifact("pretrained_model", path)
    figures = {"source_accuracy": source_accuracy}
    if use_torchvision:
        model, message = torchvision_resnet18(TARGET_CLASSES)
        print(f"  --torchvision-weights: {message}")
        figures["torchvision_weights_loaded"] = model is not None
    else:
        print("  (add --torchvision-weights to also load ResNet18_Weights.DEFAULT)")
    return path, figures


if in_notebook():
    pretrained_path, figures = lesson_1_pretrain(run, run.args.torchvision_weights)
    run.record_all(figures)


# %% 2. Loading into a changed architecture
# The target model has a 4-class head; the checkpoint's head has 16 outputs.
# - load_state_dict (strict) fails on the head's shape ("size mismatch for head.1.weight").
# - strict=False does NOT forgive shapes, only missing/unexpected keys; it returns them as
#   result.missing_keys / result.unexpected_keys, which you must read, not ignore.
# - The fix: drop mis-shaped entries first. load_what_fits() does it and reports every key.
# - A model with other names (features/classifier) warm-starts by renaming keys.


def lesson_2_load_what_fits(run: Run, pretrained_path: Path) -> dict:
    """The 16-class checkpoint into a 4-class model: strict, strict=False, load_what_fits.

    Expect 14 tensors loaded and 2 skipped for shape (the head's weight and bias, 16 -> 4
    classes); the renamed model loads the same 14 through its key mapping.
    """
    run.section("2. Loading into a changed architecture")
    state_dict = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    for strict in (True, False):
        try:
            FineTunableCNN().load_state_dict(state_dict, strict=strict)
        except RuntimeError as err:
            mismatch = next(line.strip() for line in str(err).splitlines() if "size" in line)
            print(f"  load_state_dict(strict={strict}): {mismatch[:100]}")
    backbone_only = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    result = FineTunableCNN().load_state_dict(backbone_only, strict=False)
    print(f"  strict=False with the backbone only: missing_keys={result.missing_keys}, "
          f"unexpected_keys={result.unexpected_keys}")
    report = load_what_fits(FineTunableCNN(), state_dict)
    print("  load_what_fits:\n    " + str(report).replace("\n", "\n    "))
    renamed_model = RenamedCNN()
    renamed = load_what_fits(renamed_model, state_dict,
                             rename=lambda key: key.replace("backbone.", "features.", 1)
                             .replace("head.", "classifier.", 1))
    print(f"  RenamedCNN with backbone.* -> features.*: loaded {len(renamed.loaded)}, "
          f"skipped {[k for k, _, _ in renamed.skipped_shape]}")
    return {"load_report_loaded": len(report.loaded),
            "load_report_skipped_shape": len(report.skipped_shape),
            "renamed_model_loaded": len(renamed.loaded)}


if in_notebook():
    run.record_all(lesson_2_load_what_fits(run, pretrained_path))


# %% 3. Freezing the backbone
# requires_grad_(False) on the backbone: no gradients, no updates, less memory. Build the
# optimizer over the trainable parameters only (filter(lambda p: p.requires_grad, ...)).
# Optimizers skip a parameter whose .grad is None, so a frozen one inside the optimizer does
# not move by itself. The reasons to leave it out: a parameter that already HAS a .grad (it
# trained before you froze it) keeps it, zero_grad(set_to_none=False) only fills it with
# zeros, and then momentum and weight decay DO move that "frozen" weight (one frozen from the
# start keeps grad None and stays put; both are measured below); and
# the optimizer's state and param_groups (and so its state_dict) would describe
# parameters it never trains, a layout that no longer fits once you unfreeze (section 4).
# And keep frozen BatchNorm in eval():
# in train mode it keeps updating running_mean/var from target batches, so the "frozen"
# backbone changes anyway. Below: one epoch head-only, with and without that care.


def lesson_3_freezing(run: Run, pretrained_path: Path, loaders) -> dict:
    """One head-only epoch, frozen by requires_grad alone and with BatchNorm kept in eval.

    Both runs leave the backbone's weights untouched (no gradients); only the second leaves
    its running statistics untouched too. The drift of the first is the pitfall.
    """
    run.section("3. Freezing the backbone")
    state_dict = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    drift = {}
    for label, keep_bn_eval in (("requires_grad only", False), ("+ BatchNorm in eval", True)):
        model = FineTunableCNN().to(run.device)
        load_what_fits(model, state_dict)
        before = copy.deepcopy(model.backbone.state_dict())
        model.freeze_backbone(True)
        if not keep_bn_eval:
            model.backbone_frozen = False  # gradients off, but train() now reaches BatchNorm
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=HEAD_LR)
        train_one_epoch(model, loaders[0], optimizer, run.device)
        after = model.backbone.state_dict()
        params = max(max_abs_diff(before[k], after[k]) for k, _ in
                     model.backbone.named_parameters())
        buffers = max(max_abs_diff(before[k], after[k]) for k, b in
                      model.backbone.named_buffers() if b.is_floating_point())
        drift[label] = (params, buffers)
        print(f"  {label:<22} trainable tensors {len(trainable)}; backbone weights max |diff| "
              f"{params}, BatchNorm running stats max |diff| {buffers:.4g}")
    moved = frozen_weight_drift(seed=run.seed)
    for case, (grad_is_none, distance) in moved.items():
        print(f"  frozen but left in an SGD(momentum, weight_decay) optimizer, {case}: grad "
              f"{'None' if grad_is_none else 'zero-filled'}, moved max |diff| {distance:.3g}")
    return {"frozen_from_start_moved": moved["frozen from the start"][1],
            "frozen_after_training_moved": moved["trained one step, then frozen"][1],
            "frozen_params_max_abs_diff": drift["+ BatchNorm in eval"][0],
            "frozen_buffers_max_abs_diff": drift["+ BatchNorm in eval"][1],
            "bn_train_mode_buffer_drift": drift["requires_grad only"][1]}


def frozen_weight_drift(steps: int = 3, seed: int = 0) -> dict[str, tuple[bool, float]]:
    """A first layer frozen with requires_grad_(False) but left in the optimizer, trained
    with zero_grad(set_to_none=False): {case: (its grad is None, how far it moved)}."""
    moved = {}
    for case in ("frozen from the start", "trained one step, then frozen"):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        inputs, targets = torch.randn(16, 8), torch.randint(0, 2, (16,))
        first = case.startswith("trained")  # one step with the layer still trainable
        for step in range(steps + first):
            if step == first:
                model[0].requires_grad_(False)
                before = model[0].weight.detach().clone()
            optimizer.zero_grad(set_to_none=False)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        moved[case] = (model[0].weight.grad is None, max_abs_diff(before, model[0].weight))
    return moved


if in_notebook():
    run.record_all(lesson_3_freezing(run, pretrained_path, loaders))


# %% 4. Gradual unfreezing, with a checkpoint at the phase change
# Phase 1 trains the new head alone (the backbone's features are fine; a random head's big
# gradients would damage them); phase 2 unfreezes the backbone with a 30x smaller learning rate
# (HEAD_LR / BACKBONE_LR = 3e-2 / 1e-3: discriminative learning rates, one param group each;
# optimizer.add_param_group adds it). At the end of phase 1 the loop saves a checkpoint that
# records the phase, because the optimizer's layout depends on it (section 4b).
# Exactness needs every generator the next epoch draws from: the loader's (shuffle order),
# torch's CPU one and, on a GPU, each CUDA device's (Dropout in the head runs there): the
# checkpoint's "rng" entry holds them all (common.training.capture_rng_state, taught in 02).
# On a GPU, also torch.backends.cudnn.deterministic = True, cudnn.benchmark = False and
# torch.use_deterministic_algorithms(True): cuDNN's fastest convolution algorithms are
# chosen per run and some backward kernels are non-deterministic, so without them two runs
# differ in the last bits even with no resume at all. Sections 4 and 4b run inside
# deterministic_kernels(run.device), which sets them on CUDA and puts them back after.


def lesson_4_gradual_unfreezing(run: Run, pretrained_path: Path, loaders) -> dict:
    """Fine-tune for EPOCHS epochs (head, then all), saving a checkpoint after phase 1.

    The loader's generator is put back to where it started afterwards, so that section 4b
    replays exactly the data order this run saw.
    """
    run.section("4. Gradual unfreezing, with a checkpoint at the phase change")
    checkpoint_path = run.path("finetune_checkpoint_epoch002.pt")

    def save_at_phase_end(epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == UNFREEZE_AT:
            torch.save({"epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "config": {"phase": 1},
                        "rng": capture_rng_state(loaders[0].generator)}, checkpoint_path)

    seed_everything(run.seed)
    generator_start = loaders[0].generator.get_state()
    model = FineTunableCNN().to(run.device)
    load_what_fits(model, torch.load(pretrained_path, map_location="cpu", weights_only=True))
    with deterministic_kernels(run.device):  # on CUDA; the CPU kernels here already are
        optimizer, accuracies = fine_tune(model, loaders, run.device,
                                          on_epoch_end=save_at_phase_end)
    loaders[0].generator.set_state(generator_start)  # section 4b replays the same data order
    print(f"  param groups at the end: {[(g['name'], g['lr']) for g in optimizer.param_groups]}")
    print(f"  target validation accuracy per epoch: {[round(a, 3) for a in accuracies]}")
    run.artifact("finetune_checkpoint", checkpoint_path)
    return {"model": model, "checkpoint_path": checkpoint_path}


if in_notebook():
    tuned = lesson_4_gradual_unfreezing(run, pretrained_path, loaders)


# %% 4b. Resuming across a phase change
# Saving and resuming: an optimizer's state_dict records its param groups, so the phase-1
# state does NOT load into a phase-2 optimizer ("loaded state dict has a different number of
# parameter groups"). Save the phase with the checkpoint, rebuild the optimizer for THAT
# phase, load its state, restore every generator, and let the loop unfreeze at the same epoch
# it would have. The result must equal the uninterrupted run of section 4 exactly.


def lesson_4b_resume_phases(run: Run, loaders, tuned: dict) -> dict:
    """Resume section 4's phase-1 checkpoint: the wrong layout fails, the right one is exact.

    max |diff| = 0.0 against section 4's final weights means nothing was lost across the
    phase change: optimizer moments, the unfreezing epoch, Dropout masks and data order.
    """
    run.section("4b. Resuming across a phase change")
    checkpoint = torch.load(tuned["checkpoint_path"], map_location=run.device, weights_only=True)
    phase = checkpoint["config"]["phase"]
    resumed = FineTunableCNN().to(run.device)
    resumed.load_state_dict(checkpoint["model"])
    resumed.freeze_backbone(False)
    try:
        build_optimizer(resumed, phase=2).load_state_dict(checkpoint["optimizer"])
    except ValueError as err:
        print(f"  phase-1 optimizer state into a phase-2 optimizer: {err}")
    resumed.freeze_backbone(phase == 1)
    restored = build_optimizer(resumed, phase=phase)
    restored.load_state_dict(checkpoint["optimizer"])
    generator_start = loaders[0].generator.get_state()
    restore_rng_state(checkpoint["rng"], loaders[0].generator)
    with deterministic_kernels(run.device):
        fine_tune(resumed, loaders, run.device, start_epoch=checkpoint["epoch"],
                  optimizer=restored)
    loaders[0].generator.set_state(generator_start)
    diff = max_abs_diff(tuned["model"].state_dict(), resumed.state_dict())
    print(f"  resumed at epoch {checkpoint['epoch']} with the phase-{phase} layout, then "
          f"unfrozen: final weights vs uninterrupted max |diff| = {diff}")
    return {"phased_resume_max_abs_diff": diff,
            "checkpoint_rng_keys": ", ".join(sorted(checkpoint["rng"]))}


if in_notebook():
    run.record_all(lesson_4b_resume_phases(run, loaders, tuned))


# %% 5. Saving what changed
# A fine-tuned model is a base (the pretrained file everyone has) plus what training changed.
# After the head-only phase only the head differs, so the delta is tiny: ship it, and
# rebuild = load the base, then load the delta (load_what_fits / strict=False). Compare the
# rebuilt model's outputs with the fine-tuned one's: identical. After full fine-tuning every
# tensor changed, and the delta is the whole model.


def lesson_5_save_delta(run: Run, pretrained_path: Path, tuned: dict, inputs) -> dict:
    """Full and delta files after the head-only phase and after full fine-tuning; rebuild.

    After the head-only phase the delta is the head (two tensors, about a tenth of the
    file); after full fine-tuning every tensor moved, and the delta is the whole model.
    """
    run.section("5. Saving what changed")
    base = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    head_only = torch.load(tuned["checkpoint_path"], map_location="cpu",
                           weights_only=True)["model"]  # the weights after the head-only phase
    full = {k: v.cpu() for k, v in tuned["model"].state_dict().items()}
    sizes, figures = {}, {}
    for label, state_dict in (("head-only phase", head_only), ("full fine-tune", full)):
        delta = state_dict_delta(state_dict, base)
        full_path = run.path(f"saved/{label.split()[0]}_full.pt")
        delta_path = run.path(f"saved/{label.split()[0]}_delta.pt")
        torch.save(state_dict, full_path)
        torch.save(delta, delta_path)
        sizes[label] = (full_path.stat().st_size, delta_path.stat().st_size)
        rebuilt = FineTunableCNN()
        load_what_fits(rebuilt, base)  # 1. the base, as everyone has it
        rebuilt.load_state_dict(torch.load(delta_path, map_location="cpu", weights_only=True),
                                strict=False)  # 2. the delta on top
        reference = FineTunableCNN()
        reference.load_state_dict(state_dict)
        with torch.no_grad():
            diff = max_abs_diff(rebuilt.eval()(inputs.cpu()), reference.eval()(inputs.cpu()))
        print(f"  {label:<16} full {format_bytes(sizes[label][0]):>9}, delta "
              f"{format_bytes(sizes[label][1]):>9} ({len(delta)} tensors: "
              f"{sorted(delta)[:3]}{' ...' if len(delta) > 3 else ''}); base + delta vs "
              f"fine-tuned: max |diff| = {diff}")
        figures[f"{label.split()[0].replace('-', '_')}_delta_rebuild_max_abs_diff"] = diff
    final_path = run.path("finetuned_model.pt")
    torch.save(full, final_path)
    run.artifact("finetuned_model", final_path)
    run.artifact("deltas", full_path.parent)
    return figures | {"head_only_full_bytes": sizes["head-only phase"][0],
                      "head_only_delta_bytes": sizes["head-only phase"][1]}


if in_notebook():
    run.record_all(lesson_5_save_delta(run, pretrained_path, tuned, next(iter(loaders[1]))[0]))


# %% 6. The feature-extractor pattern
# Sometimes you only need the backbone's features: for a linear probe, retrieval, or to train
# many small heads without re-running the backbone. torchvision's create_feature_extractor
# rewrites a model (via torch.fx) to return named intermediate outputs; get_graph_node_names
# lists the names. (A forward hook on the layer does the same without rewriting.) Save the
# features once as tensors, then train on them in milliseconds.


def lesson_6_feature_extractor(run: Run, pretrained_path: Path, loaders) -> tuple[Path, dict]:
    """Extract backbone features with create_feature_extractor and save them.

    A forward hook on the same layer sees the same tensor (max |diff| 0.0): the extractor
    is a rewrite of the model, not an approximation of it.
    """
    run.section("6. The feature-extractor pattern")
    model = SmallCNN(num_classes=SOURCE_CLASSES)
    model.load_state_dict(torch.load(pretrained_path, map_location="cpu", weights_only=True))
    model.eval()
    _, eval_nodes = get_graph_node_names(model)
    print(f"  some node names: {[n for n in eval_nodes if n.startswith('backbone')][-3:]}")
    extractor = create_feature_extractor(model, return_nodes={"backbone.8": "features"})
    captured = {}
    hook = model.backbone[8].register_forward_hook(
        lambda module, args, output: captured.update(features=output))
    features = {}
    with torch.no_grad():
        for split, loader in (("train", loaders[0]), ("val", loaders[1])):
            batches = [(extractor(x)["features"], y) for x, y in loader]
            features[split] = (torch.cat([f for f, _ in batches]),
                               torch.cat([y for _, y in batches]))
        model(next(iter(loaders[1]))[0])
    hook.remove()
    hook_diff = max_abs_diff(captured["features"], extractor(next(iter(loaders[1]))[0])
                             ["features"].detach())
    path = run.path("target_features.pt")
    torch.save({"train": features["train"], "val": features["val"], "node": "backbone.8"},
               path)
    run.artifact("features", path)
    print(f"  saved features {tuple(features['train'][0].shape)} + "
          f"{tuple(features['val'][0].shape)} from node backbone.8; forward hook vs extractor "
          f"max |diff| = {hook_diff}")
    return path, {"feature_hook_max_abs_diff": hook_diff}


if in_notebook():
    features_path, figures = lesson_6_feature_extractor(run, pretrained_path, loaders)
    run.record_all(figures)


# %% 6b. Training on saved features
# With the features on disk, a new head trains in milliseconds: no backbone forward pass at
# all. Here a linear probe (one Linear layer, full batch) fits the 96 saved training features
# and is scored on the 400 validation ones. Saved features are plain tensors, so the file
# loads with weights_only=True; it records which node they came from.


def lesson_6b_linear_probe(run: Run, path: Path) -> dict:
    """Fit a linear probe on the saved features; score it on the validation features."""
    run.section("6b. Training on saved features")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    train_x, train_y = saved["train"]
    val_x, val_y = saved["val"]
    probe = nn.Linear(train_x.shape[1], TARGET_CLASSES)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(probe(train_x), train_y).backward()
        optimizer.step()
    accuracy = (probe(val_x).argmax(1) == val_y).float().mean().item()
    print(f"  linear probe on {len(train_x)} saved training features ({saved['node']}): "
          f"validation accuracy {accuracy:.3f}")
    return {"linear_probe_accuracy": accuracy}


if in_notebook():
    run.record_all(lesson_6b_linear_probe(run, features_path))


# %% 7. Measured transfer: pretrained vs from scratch
# The claim of transfer learning, measured fairly. For each seed both runs see the same target
# images in the same order (the train loader's generator is re-seeded before each run) for the
# same 5 epochs, each with its OWN learning rates: transfer is section 4's gradual unfreezing
# (HEAD_LR and BACKBONE_LR, tuned when this lesson was written); scratch trains the whole
# network with Adam at the best of SCRATCH_LRS, picked here on the first seed by the very
# validation accuracy it is scored on, which if anything flatters scratch. One seed can be
# luck, so SEEDS seeds, reported as mean and spread.


def target_curve(run: Run, pretrained: dict, loaders, seed: int,
                 scratch_lr: float | None = None) -> list[float]:
    """Target validation accuracy per epoch for one seed; scratch_lr None = transfer."""
    seed_everything(seed)
    loaders[0].generator.manual_seed(seed)  # the same data order for both kinds
    if scratch_lr is None:
        model = FineTunableCNN().to(run.device)
        load_what_fits(model, pretrained)
        return fine_tune(model, loaders, run.device)[1]
    model = SmallCNN(num_classes=TARGET_CLASSES).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=scratch_lr)
    accuracies = []
    for _ in range(EPOCHS):
        train_one_epoch(model, loaders[0], optimizer, run.device)
        accuracies.append(evaluate(model, loaders[1], run.device)["accuracy"])
    return accuracies


def lesson_7_transfer_vs_scratch(run: Run, pretrained_path: Path, loaders) -> tuple:
    """Sweep scratch's learning rate, then both kinds over SEEDS seeds; mean and spread.

    The loader's generator is restored afterwards, so nothing after this lesson depends on
    how many seeds it ran.
    """
    run.section("7. Measured transfer: pretrained vs from scratch")
    pretrained = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    generator_start = loaders[0].generator.get_state()
    seeds = [run.seed + offset for offset in range(SEEDS)]
    sweep = {lr: target_curve(run, pretrained, loaders, seeds[0], lr) for lr in SCRATCH_LRS}
    scratch_lr = max(sweep, key=lambda lr: sweep[lr][-1])
    print("  scratch learning-rate sweep (seed "
          f"{seeds[0]}): {', '.join(f'{lr:g} -> {c[-1]:.3f}' for lr, c in sweep.items())}; "
          f"using {scratch_lr:g}")
    curves = {"transfer": [target_curve(run, pretrained, loaders, seed) for seed in seeds],
              "scratch": [sweep[scratch_lr]] + [target_curve(run, pretrained, loaders, seed,
                                                             scratch_lr) for seed in seeds[1:]]}
    loaders[0].generator.set_state(generator_start)
    final = {kind: torch.tensor([c[-1] for c in runs]) for kind, runs in curves.items()}
    for seed, ours, theirs in zip(seeds, final["transfer"], final["scratch"], strict=True):
        print(f"  seed {seed}: transfer {ours:.3f}  scratch {theirs:.3f}")
    wins = int((final["transfer"] > final["scratch"]).sum())
    print(f"  mean over {SEEDS} seeds: transfer {final['transfer'].mean():.3f} "
          f"(std {final['transfer'].std():.3f}) vs scratch {final['scratch'].mean():.3f} "
          f"(std {final['scratch'].std():.3f}); transfer wins on {wins} of {SEEDS} seeds")
    return curves, {"transfer_accuracy": float(final["transfer"].mean()),
                    "scratch_accuracy": float(final["scratch"].mean()),
                    "transfer_accuracy_std": float(final["transfer"].std()),
                    "scratch_accuracy_std": float(final["scratch"].std()),
                    "transfer_vs_scratch_seeds": SEEDS, "transfer_wins_seeds": wins,
                    "scratch_lr": scratch_lr}


if in_notebook():
    curves, figures = lesson_7_transfer_vs_scratch(run, pretrained_path, loaders)
    run.record_all(figures)


# %% 7b. The learning curves, seed by seed
# One picture for the claim: the mean target accuracy per epoch of each kind, with a band
# from the worst to the best seed, and the epoch where the backbone unfreezes. Where the
# bands do not overlap, no choice of seed would reverse the conclusion.


def lesson_7b_plot(run: Run, curves: dict, scratch_lr: float) -> None:
    """Mean curves with min-max bands over the seeds; saved as transfer_vs_scratch.png."""
    run.section("7b. The learning curves, seed by seed")
    figure, axes = plt.subplots(figsize=(6, 4))
    epochs = range(1, EPOCHS + 1)
    for kind, label in (("transfer", "transfer (pretrained backbone)"),
                        ("scratch", f"from scratch (Adam, lr {scratch_lr:g})")):
        runs = torch.tensor(curves[kind])
        axes.plot(epochs, runs.mean(0), marker="o", label=f"{label}, mean")
        axes.fill_between(epochs, runs.min(0).values, runs.max(0).values, alpha=0.2)
    axes.axvline(UNFREEZE_AT + 0.5, color="grey", linestyle=":", label="backbone unfrozen")
    axes.set_xticks(list(epochs))
    axes.set(xlabel="epoch", ylabel="target validation accuracy", ylim=(0, 1),
             title=f"{TARGET_TRAIN} target images, {len(curves['transfer'])} seeds "
                   "(band: min to max)")
    axes.legend()
    run.save_figure(figure, "transfer_vs_scratch.png", "learning_curves")


if in_notebook():
    lesson_7b_plot(run, curves, run.metrics["scratch_lr"])


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "strict=False forgives missing/unexpected keys, never shapes: filter by shape "
    "(load_what_fits) and READ the report",
    "freeze = requires_grad_(False) + BatchNorm in eval() + an optimizer over trainable "
    "parameters; save the phase and every generator with the optimizer state",
    "ship base + delta when only part of the model changed; rebuild exactly",
    "measure transfer against a tuned scratch baseline over several seeds",
]
TRY_IT = ("set UNFREEZE_AT = 0 (fine-tune everything from the start) and compare the "
          "curves; then run 07_distributed_training.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run, loaders = setup(argv)
    pretrained_path, figures = lesson_1_pretrain(run, run.args.torchvision_weights)
    run.record_all(figures)
    run.record_all(lesson_2_load_what_fits(run, pretrained_path))
    run.record_all(lesson_3_freezing(run, pretrained_path, loaders))
    tuned = lesson_4_gradual_unfreezing(run, pretrained_path, loaders)
    run.record_all(lesson_4b_resume_phases(run, loaders, tuned))
    run.record_all(lesson_5_save_delta(run, pretrained_path, tuned, next(iter(loaders[1]))[0]))
    features_path, figures = lesson_6_feature_extractor(run, pretrained_path, loaders)
    run.record_all(figures)
    run.record_all(lesson_6b_linear_probe(run, features_path))
    curves, figures = lesson_7_transfer_vs_scratch(run, pretrained_path, loaders)
    run.record_all(figures)
    lesson_7b_plot(run, curves, figures["scratch_lr"])
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
