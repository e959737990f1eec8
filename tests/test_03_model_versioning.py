"""Unit tests of 03's fingerprints, version rules, registry, integrity checks and migration."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.models import MLP
from tests import zygote
from tests.conftest import ROOT, load_script

lesson = load_script("03_model_versioning")
SMALL = {"class": "MLP", "kwargs": {"in_features": 20, "hidden": 16, "num_classes": 4,
                                    "dropout": 0.1}}
CONFIG = {"seed": 0, "lr": 3e-3, "epochs": 1, "batch_size": 64,
          "data": {"n_samples": 256, "n_features": 20, "num_classes": 4, "seed": 0},
          "init_from": None}


@pytest.fixture
def registry(tmp_path):
    registry = lesson.ModelRegistry(tmp_path / "registry")
    model, history, data_fp = lesson.train_version(CONFIG, SMALL, torch.device("cpu"))
    registry.register("m", model, architecture=SMALL, hyperparameters=CONFIG, history=history,
                      data_fingerprint=data_fp, seed=0)
    return registry


def test_content_fingerprint_is_the_same_across_formats_order_and_devices(tmp_path):
    state_dict = MLP().state_dict()
    expected = lesson.content_fingerprint(state_dict)
    torch.save(state_dict, tmp_path / "a.pt")
    save_file(dict(state_dict), tmp_path / "a.safetensors")
    assert lesson.content_fingerprint(
        torch.load(tmp_path / "a.pt", map_location="cpu", weights_only=True)) == expected
    assert lesson.content_fingerprint(load_file(tmp_path / "a.safetensors")) == expected
    assert lesson.content_fingerprint(dict(reversed(list(state_dict.items())))) == expected
    non_contiguous = {k: v.t().contiguous().t() if v.dim() == 2 else v
                      for k, v in state_dict.items()}
    assert lesson.content_fingerprint(non_contiguous) == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: would show that "
                    "tensors on the GPU give the CPU's content fingerprint")
def test_content_fingerprint_is_the_same_on_the_gpu():
    state_dict = MLP().state_dict()
    on_gpu = {k: v.cuda() for k, v in state_dict.items()}
    assert all(v.is_cuda for v in on_gpu.values())
    assert lesson.content_fingerprint(on_gpu) == lesson.content_fingerprint(state_dict)


@pytest.mark.parametrize("key", list(MLP().state_dict()))
def test_content_fingerprint_changes_with_any_one_element(key):
    state_dict = MLP().state_dict()
    changed = {k: v.clone() for k, v in state_dict.items()}
    changed[key].view(-1)[-1] += 1e-7 if changed[key].abs().view(-1)[-1] < 1 else 1e-4
    assert not torch.equal(changed[key], state_dict[key])
    assert lesson.content_fingerprint(changed) != lesson.content_fingerprint(state_dict)
    assert lesson.architecture_signature(changed) == lesson.architecture_signature(state_dict)


def test_dtype_and_renames_change_the_fingerprint():
    state_dict = MLP().state_dict()
    fingerprint = lesson.content_fingerprint(state_dict)
    assert lesson.content_fingerprint({k: v.double() for k, v in state_dict.items()}) != \
        fingerprint
    renamed = {f"x.{k}": v for k, v in state_dict.items()}
    assert lesson.content_fingerprint(renamed) != fingerprint
    assert lesson.architecture_signature(renamed) != lesson.architecture_signature(state_dict)


def test_signature_vs_content():
    a, b = MLP(hidden=16).state_dict(), MLP(hidden=16).state_dict()  # two random inits
    assert lesson.content_fingerprint(a) != lesson.content_fingerprint(b)
    assert lesson.architecture_signature(a) == lesson.architecture_signature(b)
    assert lesson.architecture_signature(MLP(hidden=17).state_dict()) != \
        lesson.architecture_signature(a)


def test_version_bump_rules():
    assert lesson.next_version([], "A") == "1.0"
    assert lesson.next_version([("1.0", "A")], "A") == "1.1"
    assert lesson.next_version([("1.0", "A"), ("1.1", "A")], "B") == "2.0"
    assert lesson.next_version([("1.0", "A"), ("1.1", "A"), ("2.0", "B")], "B") == "2.1"
    assert lesson.next_version([("1.0", "A"), ("1.1", "A"), ("2.0", "B")], "A") == "1.2"
    assert lesson.next_version([("1.0", "A"), ("2.0", "B")], "C") == "3.0"


def test_registry_versions_duplicates_and_immutability(registry, tmp_path):
    first = registry.load("m", "1.0")
    assert first.metadata["version"] == "1.0" and first.metadata["parent"] is None
    again = registry.register("m", first.model, architecture=SMALL, hyperparameters=CONFIG,
                              history=[], data_fingerprint="x", seed=0)
    assert again.metadata["version"] == "1.0" and registry.versions("m") == ["1.0"]
    with torch.no_grad():
        first.model.net[0].weight[0, 0] += 1
    second = registry.register("m", first.model, architecture=SMALL, hyperparameters=CONFIG,
                               history=[], data_fingerprint="x", seed=0, parent="1.0")
    assert second.metadata["version"] == "1.1"
    wide = MLP(hidden=32)
    third = registry.register("m", wide, architecture={"class": "MLP",
                                                       "kwargs": {"hidden": 32}},
                              hyperparameters=CONFIG, history=[], data_fingerprint="x", seed=0)
    assert third.metadata["version"] == "2.0"
    with pytest.raises(FileExistsError, match="immutable"):
        third.save(registry.folder("m", "2.0"))


def test_metadata_records_what_reproduces_the_version(registry):
    metadata = json.loads((registry.folder("m", "1.0") / "metadata.json").read_text())
    env = metadata["environment"]
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    assert len(env["data_fingerprint"]) == 64
    assert "git_commit" in env and metadata["created"]
    assert [h["epoch"] for h in metadata["history"]] == [1]
    assert (registry.folder("m", "1.0") / "MODEL_CARD.md").read_text().startswith("# m 1.0")


def test_retraining_from_the_record_reproduces_the_fingerprint(registry):
    record = registry.load("m", "1.0").metadata
    model, _, _ = lesson.train_version(record["hyperparameters"], record["architecture"],
                                       torch.device("cpu"))
    assert lesson.content_fingerprint(model.state_dict()) == record["fingerprints"]["content"]


def test_aliases_move_and_resolve(registry):
    model = registry.load("m", "1.0").model
    with torch.no_grad():
        model.net[0].bias.add_(1)
    registry.register("m", model, architecture=SMALL, hyperparameters=CONFIG, history=[],
                      data_fingerprint="x", seed=0, parent="1.0")
    registry.set_alias("m", "production", "1.0")
    assert registry.resolve("m", "production") == "1.0"
    registry.set_alias("m", "production", "1.1")
    assert registry.load("m", "production").metadata["version"] == "1.1"
    assert registry.aliases("m") == {"production": "1.1"}
    with pytest.raises(KeyError, match="no version 9.9"):
        registry.set_alias("m", "staging", "9.9")
    with pytest.raises(KeyError, match="neither a version"):
        registry.resolve("m", "canary")


def tamper_cases(folder):
    """Each case damages a copy of a good version folder in one way; returns the expected text."""
    def flip_weight_byte():
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
        return r"tampered weights: .*changed: net\.5\.weight"

    def edit_metadata():
        path = folder / "metadata.json"
        path.write_text(path.read_text().replace('"lr": 0.003', '"lr": 0.03'))
        return "metadata.json: edited after saving"

    def bad_json():
        (folder / "metadata.json").write_text("{oops")
        return "metadata.json: bad metadata, not valid JSON"

    def missing_field():
        path = folder / "metadata.json"
        data = json.loads(path.read_text())
        del data["fingerprints"]
        path.write_text(json.dumps(data))
        return "bad metadata, missing field 'fingerprints'"

    def missing_weights():
        (folder / "model.safetensors").unlink()
        return "model.safetensors: missing weights file"

    def truncated_weights():
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
        return "not a readable safetensors file"

    def missing_metadata():
        (folder / "metadata.json").unlink()
        return "metadata.json: missing metadata file"

    return {f.__name__: f for f in (flip_weight_byte, edit_metadata, bad_json, missing_field,
                                    missing_weights, truncated_weights, missing_metadata)}


@pytest.mark.parametrize("case", list(tamper_cases(None)))
def test_integrity_errors_name_the_file_and_the_cause(registry, tmp_path, case):
    copy = tmp_path / "copy"
    shutil.copytree(registry.folder("m", "1.0"), copy)
    expected = tamper_cases(copy)[case]()
    with pytest.raises(lesson.IntegrityError, match=expected) as raised:
        lesson.VersionedModel.load(copy, lesson.build_model)
    assert str(copy) in str(raised.value)


def test_weights_of_another_version_are_refused(registry, tmp_path):
    model = registry.load("m", "1.0").model
    with torch.no_grad():
        model.net[0].bias.add_(1)
    registry.register("m", model, architecture=SMALL, hyperparameters=CONFIG, history=[],
                      data_fingerprint="x", seed=0, parent="1.0")
    copy = tmp_path / "copy"
    shutil.copytree(registry.folder("m", "1.1"), copy)
    shutil.copy(registry.folder("m", "1.0") / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(lesson.IntegrityError, match="belong to another version"):
        lesson.verify_version(copy)


def test_migration_reads_old_parameter_names():
    legacy = lesson.LegacyMLP()
    migrated = lesson.RenamedMLP()
    migrated.load_state_dict(legacy.state_dict())
    inputs = torch.randn(5, 20)
    assert torch.equal(legacy(inputs), migrated(inputs))
    # Through safetensors the version record is gone (None): still treated as the old layout.
    migrated_again = lesson.RenamedMLP()
    migrated_again.load_state_dict(dict(legacy.state_dict()))
    assert torch.equal(legacy(inputs), migrated_again(inputs))
    # New checkpoints carry version 2 and load as they are.
    fresh = lesson.RenamedMLP()
    fresh.load_state_dict(migrated.state_dict())
    assert torch.equal(fresh(inputs), migrated(inputs))
    with pytest.raises(RuntimeError, match="Missing key"):
        lesson.LegacyMLP().load_state_dict(migrated.state_dict())


def run_verify(path):
    return zygote.run([sys.executable, str(ROOT / "03_model_versioning.py"), "--verify",
                       str(path)], capture_output=True, text=True, timeout=120, check=False)


def test_verify_cli_exit_codes(registry, tmp_path, capsys):
    good = registry.folder("m", "1.0")
    completed = run_verify(good)  # the real command line, in a child
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.startswith("OK: ") and completed.stdout.count("\n") == 1
    assert lesson.verify_cli(str(good / "model.safetensors")) == 0  # the file works as well
    assert capsys.readouterr().out.startswith("OK: ")
    copy = tmp_path / "copy"
    for case in tamper_cases(None):  # the same function the flag calls, in this process
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(good, copy)
        tamper_cases(copy)[case]()
        assert lesson.verify_cli(str(copy)) == 1, case
        printed = capsys.readouterr().out
        assert printed.startswith("FAILED: ") and printed.count("\n") == 1, printed
    completed = run_verify(copy)  # and one failure through the command line
    assert completed.returncode == 1 and completed.stdout.startswith("FAILED: ")
    assert "Traceback" not in completed.stdout + completed.stderr
    assert lesson.verify_cli(str(tmp_path / "does-not-exist")) == 1
    assert "no such version folder" in capsys.readouterr().out


def test_a_corrupt_registry_index_is_a_clear_error(registry):
    index = registry.root / "m" / "registry.json"
    index.write_text("[]")
    with pytest.raises(lesson.IntegrityError, match="registry.json: not a valid registry index"):
        registry.versions("m")
    assert (registry.folder("m", "1.0") / "model.safetensors").exists()
