"""Unit tests of 06's pieces: load_what_fits, freezing, deltas, the torchvision flag offline."""

from __future__ import annotations

import torch

from common.compare import max_abs_diff
from common.data import make_image_classification, make_loaders
from common.models import SmallCNN
from tests.conftest import load_script

lesson = load_script("06_transfer_learning")


def test_load_what_fits_reports_every_kind_of_key():
    source = SmallCNN(num_classes=16).state_dict()
    del source["backbone.0.bias"]  # missing in the checkpoint
    source["extra.weight"] = torch.ones(3)  # unexpected
    model = lesson.FineTunableCNN(num_classes=4)
    report = lesson.load_what_fits(model, source)
    assert report.missing == ["backbone.0.bias"]
    assert report.unexpected == ["extra.weight"]
    assert report.skipped_shape == [("head.1.weight", (16, 32), (4, 32)),
                                    ("head.1.bias", (16,), (4,))]
    assert "backbone.0.weight" in report.loaded and "head.1.weight" not in report.loaded
    assert torch.equal(model.state_dict()["backbone.0.weight"], source["backbone.0.weight"])


def test_load_what_fits_with_renamed_keys():
    source = SmallCNN().state_dict()
    model = lesson.RenamedCNN()
    report = lesson.load_what_fits(model, source, rename=lambda k: k.replace(
        "backbone.", "features.", 1).replace("head.", "classifier.", 1))
    assert not report.missing and not report.unexpected and not report.skipped_shape
    assert max_abs_diff(model.features.state_dict(),
                        {k[len("backbone."):]: v for k, v in source.items()
                         if k.startswith("backbone.")}) == 0.0


def small_target_loaders():
    dataset = make_image_classification(96, num_classes=4, template_seed=7, seed=3)
    return make_loaders(dataset, batch_size=8, val_fraction=0.25, seed=3)


def test_frozen_backbone_does_not_change_during_head_training():
    pretrained = SmallCNN(num_classes=16).state_dict()
    model = lesson.FineTunableCNN()
    lesson.load_what_fits(model, pretrained)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    lesson.fine_tune(model, small_target_loaders(), torch.device("cpu"),
                     stop_after=lesson.UNFREEZE_AT)
    backbone = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    assert max_abs_diff(backbone, {k: pretrained[k] for k in backbone}) == 0.0  # + BN stats
    assert max_abs_diff(model.head.state_dict(), head_before) > 0.0
    model.train()
    assert model.training and model.head.training and not model.backbone.training


def test_unfrozen_backbone_does_change():
    model = lesson.FineTunableCNN()
    lesson.load_what_fits(model, SmallCNN(num_classes=16).state_dict())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer, accuracies = lesson.fine_tune(model, small_target_loaders(), torch.device("cpu"))
    assert [g["name"] for g in optimizer.param_groups] == ["head", "backbone"]
    assert len(accuracies) == lesson.EPOCHS
    assert max_abs_diff(model.backbone.state_dict(), before) > 0.0


def test_base_plus_delta_rebuilds_the_fine_tuned_model_exactly():
    base = SmallCNN(num_classes=16).state_dict()
    model = lesson.FineTunableCNN()
    lesson.load_what_fits(model, base)
    lesson.fine_tune(model, small_target_loaders(), torch.device("cpu"),
                     stop_after=lesson.UNFREEZE_AT)
    tuned = model.state_dict()
    delta = lesson.state_dict_delta(tuned, base)
    assert sorted(delta) == ["head.1.bias", "head.1.weight"]
    rebuilt = lesson.FineTunableCNN()
    lesson.load_what_fits(rebuilt, base)
    rebuilt.load_state_dict(delta, strict=False)
    assert max_abs_diff(rebuilt.state_dict(), tuned) == 0.0
    inputs = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(inputs), model.eval()(inputs))


def test_torchvision_flag_without_network_or_cache_says_so_and_goes_on(tmp_path, monkeypatch):
    # An empty TORCH_HOME and a proxy on a closed loopback port: no traffic leaves the machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "")
    model, message = lesson.torchvision_resnet18(4)  # returns instead of raising: the run goes on
    assert model is None
    assert message.startswith("could not load ResNet18_Weights") and "not in the cache" in message
    assert str(tmp_path / "torch_home") in message  # says where to put the file
