"""Every numbered script runs end to end (CPU always, CUDA when present) and its claims hold."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
import torch

from common.models import SmallCNN
from tests import zygote
from tests.conftest import DEVICES, SCRIPTS

RUNS = [(stem, device) for stem in SCRIPTS for device in DEVICES]


@pytest.mark.parametrize(("stem", "device"), RUNS, ids=[f"{s}-{d}" for s, d in RUNS])
def test_script_runs_and_writes_a_complete_summary(default_run, stem, device):
    run = default_run(stem, device)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    assert set(summary) == {"script", "seconds", "environment", "args", "metrics", "artifacts"}
    assert summary["script"] == stem
    assert summary["environment"]["device"].startswith(device)
    assert summary["metrics"] and summary["artifacts"]
    for name, value in summary["metrics"].items():
        assert isinstance(value, (int, float, str, bool)), name
    for name, relative in summary["artifacts"].items():
        if "://" in relative:  # an object-store URL (07's S3 checkpoint): tested in test_07_s3
            continue
        assert (run.out_dir / relative).exists(), f"artifact {name} missing: {relative}"
    # It wrote nothing into the folder it was started from.
    assert list(run.cwd.iterdir()) == []


def test_01_claims(default_run):
    metrics = default_run("01_basic_save_load").metrics
    # The three methods reload exactly, and a resumed run equals a straight one.
    assert metrics["state_dict_reload_max_abs_diff"] == 0.0
    assert metrics["pickled_model_reload_max_abs_diff"] == 0.0
    assert metrics["pickled_model_breaks_when_class_moves"] is True
    assert metrics["pickled_model_safe_globals_max_abs_diff"] == 0.0  # no weights_only=False
    # meta + assign=True: a non-persistent buffer stays on meta until recomputed.
    assert metrics["meta_buffers_left_after_assign"] == 1
    assert metrics["meta_reset_max_abs_diff"] == 0.0
    assert metrics["resume_max_abs_diff"] == 0.0
    assert metrics["multi_model_max_abs_diff"] == 0.0
    # state_dict contents: SmallCNN has 10 parameters and 6 BatchNorm buffers.
    assert (metrics["parameter_tensors"], metrics["buffer_tensors"]) == (10, 6)
    assert metrics["optimizer_state_entries"] == metrics["parameter_tensors"]
    # Pitfalls are real: the reference snapshot drifted, the view saved its whole storage.
    assert metrics["snapshot_by_reference_diff_from_current"] == 0.0
    assert metrics["snapshot_by_deepcopy_diff_from_current"] > 0.0
    assert metrics["view_file_bytes"] > 100 * metrics["cloned_view_file_bytes"]
    assert metrics["strict_false_shape_mismatch_raises"] is True
    # Devices and security.
    assert metrics["cuda_checkpoint_on_cpu_max_abs_diff"] == 0.0
    assert metrics["payload_ran_with_weights_only_true"] is False
    assert metrics["payload_ran_with_weights_only_false"] is True
    assert "builtins.exec" in metrics["unsafe_globals_found"]
    assert metrics["safe_globals_loaded_config"] is True
    # safetensors round trip, sizes by dtype and with Adam state.
    assert metrics["safetensors_max_abs_diff"] == 0.0
    assert metrics["safetensors_metadata_round_trip"] is True
    assert metrics["fp16_bytes"] < 0.55 * metrics["fp32_bytes"]
    assert metrics["bf16_bytes"] < 0.55 * metrics["fp32_bytes"]
    assert metrics["fp32_with_adam_bytes"] > 2.8 * metrics["fp32_bytes"]
    # Big checkpoint: the mmap + meta + assign path holds the weights once, the naive one twice.
    assert metrics["big_checkpoint_output_diff"] == 0.0
    assert metrics["mmap_peak_rss_above_baseline_bytes"] < metrics[
        "naive_peak_rss_above_baseline_bytes"]
    assert metrics["naive_peak_rss_above_baseline_bytes"] > 1.5 * metrics["big_checkpoint_bytes"]
    # train() vs eval().
    assert metrics["train_mode_repeat_diff"] > 0.0
    assert metrics["eval_mode_repeat_diff"] == 0.0
    assert metrics["batchnorm_running_mean_change"] > 0.0
    # Bad input: every case gets a clear error naming its file, and nothing changed.
    assert metrics["bad_input_clear_errors"] == metrics["bad_input_cases"] == 6
    assert metrics["failed_loads_model_max_abs_diff"] == 0.0
    assert metrics["trained_val_accuracy"] > 0.4  # chance is 0.25
    # 13: files you did not write.
    assert metrics["foreign_inspect_status"] == 1
    assert "argparse.Namespace" in metrics["foreign_needs"]
    assert metrics["foreign_converted_max_abs_diff"] == 0.0
    assert metrics["foreign_converted_status"] == 0
    assert metrics["child_conversion_max_abs_diff"] == 0.0
    assert metrics["tied_save_file_refused"] is True and metrics["tied_tensors_stored"] == 1
    assert metrics["tied_round_trip_max_abs_diff"] == 0.0
    assert metrics["sharded_files"] > 1 and metrics["sharded_max_abs_diff"] == 0.0
    assert metrics["sharded_inspect_status"] == 0
    assert metrics["force_weights_only_refused"] is True
    assert metrics["force_weights_only_payload_ran"] is False
    assert metrics["non_persistent_buffer_in_state_dict"] is False
    assert metrics["non_persistent_rebuilt_max_abs_diff"] == 0.0


def test_02_claims(default_run):
    run = default_run("02_checkpoint_manager")
    metrics, artifacts = run.metrics, run.summary["artifacts"]
    assert metrics["resume_max_abs_diff"] == 0.0 and metrics["resume_bit_identical"] is True
    assert metrics["crash_earlier_checkpoints_intact"] is True
    assert metrics["crash_partial_files_left"] == 0
    assert metrics["crash_checkpoints_listed_after"] == 3  # counted before the scratch goes
    assert metrics["damaged_checkpoint_skipped"] is True
    assert metrics["async_vs_sync_max_abs_diff"] == 0.0
    assert metrics["sync_save_stall_ms"] > 0 and metrics["async_save_stall_ms"] > 0
    # Section 8 measured every saver and loader (ratios are reported, never asserted on).
    assert metrics["io_state_bytes"] > 60e6
    for name in ("manager_save_vs_torch_save", "manager_load_vs_torch_load",
                 "async_stall_vs_sync", "io_gbps_raw_write_fsync_reference",
                 "io_gbps_dcp_2_writer_threads", "io_gbps_safetensors_load_file_first_forward"):
        assert metrics[name] > 0, name
    assert (run.out_dir / artifacts["io_speed_chart"]).stat().st_size > 10_000
    assert not (run.out_dir / "demo_io").exists()  # the scratch files are gone
    assert metrics["resumed_from_step"] == 0
    # 5b-5d: mid-epoch resume, preemption, the learning rate.
    assert metrics["mid_epoch_resume_max_abs_diff"] == 0.0
    assert metrics["mid_epoch_resume_position"] > 0
    assert metrics["hand_made_order_matches"] and metrics["next_epoch_order_right_with_fix"]
    assert metrics["next_epoch_order_right_without_fix"] is False  # the pitfall is real
    assert metrics["preemption_exit_status"] == 143
    assert metrics["preemption_checkpoint_mid_epoch"] is True
    assert metrics["preemption_resume_max_abs_diff"] == 0.0
    assert (run.out_dir / artifacts["preemption_timeline"]).stat().st_size > 10_000
    assert metrics["lambda_lr_right"] == 0.03125 and metrics["lambda_lr_not_saved"] == 1.0
    assert metrics["lr_resume_cases_wrong"] == 3
    # Retention: at most keep_last + save_top_k files, and the best one is among them.
    manifest = (run.out_dir / artifacts["manifest"]).read_text()
    assert 1 <= metrics["checkpoints_kept"] <= 4
    assert f"step{metrics['best_step']:06d}" in manifest
    state_dict = torch.load(run.out_dir / artifacts["final_model"], map_location="cpu",
                            weights_only=True)
    SmallCNN().load_state_dict(state_dict)
    assert metrics["final_val_accuracy"] > 0.5  # chance is 0.25


def test_03_claims(default_run):
    run = default_run("03_model_versioning")
    metrics, artifacts = run.metrics, run.summary["artifacts"]
    assert metrics["content_fingerprints_distinct"] == 1
    assert metrics["file_hashes_distinct"] > 1
    assert metrics["one_element_changes_fingerprint"] is True
    assert metrics["versions"] == "1.0, 1.1, 2.0"
    assert metrics["duplicate_registration_version"] == "1.1"
    assert metrics["tampering_detected"] is True
    assert metrics["reproduced_fingerprint_matches"] is True
    assert metrics["migration_max_abs_diff"] == 0.0
    assert metrics["verify_exit_code"] == 0
    assert (run.out_dir / artifacts["registry"]).is_dir()
    released = run.out_dir / artifacts["released_version"]
    assert (released / "model.safetensors").is_file() and (released / "metadata.json").is_file()


def test_04_claims(default_run, tmp_path):
    run = default_run("04_onnx_export")
    metrics, artifacts = run.metrics, run.summary["artifacts"]
    assert metrics["onnx_checker_passed"] is True
    # The recorded True is the script's word: check the files it wrote against the spec here.
    for name in ("onnx_model", "onnx_optimized_model"):
        onnx.checker.check_model(str(run.out_dir / artifacts[name]), full_check=True)
    assert metrics["onnx_input_dims"] == "['batch', 1, 'height', 'width']"
    assert 0 <= metrics["onnx_max_abs_diff"] < 1e-4
    assert metrics["onnx_runs_without_project_code"] is True
    # 3c-3d: a second runtime agrees; the planted fault is found at its own node.
    assert metrics["reference_vs_ort_max_abs_diff"] < 1e-4
    assert metrics["reference_vs_torch_max_abs_diff"] < 1e-4
    assert metrics["reference_evaluator_median_ms"] > 0 and metrics["reference_ort_median_ms"] > 0
    assert metrics["verify_output_max_abs_diff"] < 1e-4
    assert metrics["first_diverging_op"] == "Conv"
    assert metrics["first_diverging_node_is_planted"] is True
    assert metrics["external_data_files"] == 1 and metrics["onnx_without_data_file_fails"]
    assert metrics["external_data_max_abs_diff"] < 1e-4
    assert metrics["control_flow_export_fails"] is True
    assert metrics["torch_cond_max_abs_diff"] < 1e-5
    assert metrics["train_mode_export_warned"] is True
    # Exported in train(): a Dropout node in the file; default ORT deletes it (eval parity),
    # a runtime that honours it gives a different output each run.
    assert metrics["train_mode_dropout_nodes"] >= 1
    assert metrics["train_mode_parity_max_abs_diff"] < 1e-4
    assert metrics["train_mode_vs_batch_statistics_max_abs_diff"] > 1e-3  # inference BN only
    assert metrics["train_mode_unoptimised_repeat_diff"] > 1e-3
    assert metrics["specialised_dim_is_static"] and metrics["specialised_dim_other_size_fails"]
    for batch in (1, 32, 256):
        assert metrics[f"eager_batch{batch}_median_ms"] > 0
        assert metrics[f"ort_batch{batch}_median_ms"] > 0
    # The artifact runs in a fresh interpreter with only onnxruntime: no project code, no torch.
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "print(s.run(None, {'images': np.ones((9, 1, 16, 16), np.float32)})[0].shape)\n")
    completed = subprocess.run([sys.executable, "-I", "-c", code,
                                str(run.out_dir / artifacts["onnx_model"])], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120, check=False)
    assert completed.stdout.strip() == "(9, 4)", completed.stderr
    assert (run.out_dir / artifacts["latency_chart"]).stat().st_size > 1000


FRESH_LOAD = r"""
import sys, torch
script_path, program_path, input_path = sys.argv[1:4]
example = torch.load(input_path, map_location="cpu", weights_only=True)
batch = torch.cat([example, example, example[:1]])
scripted = torch.jit.load(script_path, map_location="cpu")
program = torch.export.load(program_path).module()
gap = float((scripted(batch) - program(batch)).abs().max())
try:
    import common  # noqa: F401
    importable = True
except ImportError:
    importable = False
print(len(batch), gap, importable)
"""


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
def test_05_claims(default_run, tmp_path):
    run = default_run("05_torchscript_export")
    metrics, artifacts = run.metrics, run.summary["artifacts"]
    assert metrics["tracer_warning_shown"] and metrics["deprecation_warning_shown"]
    assert metrics["trace_vs_eager_other_branch_diff"] > 0.1
    assert metrics["script_vs_eager_other_branch_diff"] == 0.0
    assert metrics["export_python_if_fails"] is True
    assert metrics["fresh_process_could_import_common"] is False
    assert metrics["fresh_process_torchscript_max_abs_diff"] < 1e-5
    assert metrics["fresh_process_exported_max_abs_diff"] < 1e-5
    for key in ("torchscript", "torchscript_frozen", "torch_export", "torch_compile", "aoti",
                "executorch"):
        assert metrics[f"{key}_max_abs_diff"] < 1e-4, key
        assert metrics[f"{key}_median_ms"] > 0
    assert metrics["aoti_built"] is True  # this machine has g++
    # The package is built for the run's device: section 3 kept a program there and saved
    # a separate CPU copy (move_to_device_pass works in place).
    device_type = run.summary["environment"]["device"].split(":")[0]
    assert metrics["aoti_package_device"] == device_type
    assert metrics["exported_kept_program_devices"].split(":")[0] == device_type
    # 4b: the C++ program was built and agrees with eager at batch 1 and 9.
    assert metrics["cpp_built"] is True and metrics["cpp_max_abs_diff"] < 1e-4
    assert "usage: load_model" in (run.out_dir / artifacts["cpp_source"]).read_text()
    assert (run.out_dir / "cpp" / "CMakeLists.txt").is_file()
    assert not list((run.out_dir / "cpp").glob("*.partial"))
    assert not (run.out_dir / "cpp_io").exists()  # the scratch inputs and outputs are gone
    # 4c: ExecuTorch ran at three batch sizes and refused one beyond its memory plan.
    assert metrics["executorch_built"] is True and metrics["executorch_max_abs_diff"] < 1e-4
    assert metrics["executorch_planned_max_batch"] >= 9
    assert metrics["executorch_beyond_plan_refused"] is True
    pte = run.out_dir / artifacts["executorch_program"]
    assert metrics["executorch_pte_bytes"] == pte.stat().st_size
    assert metrics["torchscript_frozen_batchnorm_folded"] is True
    # The .pt2 holds CPU tensors whatever device exported it, so it loads anywhere.
    saved = torch.export.load(run.out_dir / artifacts["exported_program"])
    assert metrics["exported_program_devices"] == "cpu"
    assert {t.device.type for t in [*saved.state_dict.values(), *saved.constants.values()]
            if isinstance(t, torch.Tensor)} == {"cpu"}
    # torch's own log lines and graph dumps never reach the reader's console.
    for spam in ("Unable to find user code", "No CUDA runtime is found", "arg0_1",
                 "register_constant", "cpuinfo_utils"):
        assert spam not in run.stdout + run.stderr, spam
    frozen = torch.jit.load(run.out_dir / artifacts["torchscript_frozen_model"],
                            map_location="cpu")
    assert not any(n.kind() == "aten::batch_norm" for n in frozen.graph.nodes())
    example = torch.load(run.out_dir / artifacts["example_input"], map_location="cpu",
                         weights_only=True)
    assert example.shape[0] == 4
    batch = torch.cat([example, example, example[:1]])  # 9: not the example's batch size
    scripted = torch.jit.load(run.out_dir / artifacts["torchscript_model"], map_location="cpu")
    reference = scripted(batch)
    program = torch.export.load(run.out_dir / artifacts["exported_program"]).module()
    torch.testing.assert_close(program(batch), reference)
    aoti = torch._inductor.aoti_load_package(str(run.out_dir / artifacts["aoti_package"]))
    torch.testing.assert_close(aoti(batch), reference, rtol=1e-4, atol=1e-5)
    # Both files load where neither common/ nor the script can be imported.
    completed = zygote.run(
        [sys.executable, "-I", "-c", FRESH_LOAD, str(run.out_dir / artifacts["torchscript_model"]),
         str(run.out_dir / artifacts["exported_program"]),
         str(run.out_dir / artifacts["example_input"])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    size, gap, importable = completed.stdout.split()
    assert size == "9" and float(gap) < 1e-5 and importable == "False"


def test_06_claims(default_run):
    run = default_run("06_transfer_learning")
    metrics, artifacts = run.metrics, run.summary["artifacts"]
    # Transfer really wins: mean over >= 3 seeds, same data order, each with its own LR.
    assert metrics["transfer_vs_scratch_seeds"] >= 3
    assert metrics["transfer_accuracy"] > metrics["scratch_accuracy"]
    # The phased checkpoint holds every generator the next epoch draws from.
    checkpoint = torch.load(run.out_dir / artifacts["finetune_checkpoint"], map_location="cpu",
                            weights_only=True)
    expected = {"python", "numpy", "torch", "loader"} | (
        {"cuda"} if torch.cuda.is_available() else set())
    assert set(checkpoint["rng"]) == expected
    assert metrics["load_report_loaded"] == 14 and metrics["load_report_skipped_shape"] == 2
    assert metrics["frozen_params_max_abs_diff"] == 0.0
    assert metrics["frozen_buffers_max_abs_diff"] == 0.0
    assert metrics["bn_train_mode_buffer_drift"] > 0.0  # the pitfall is real
    # Frozen but left in the optimizer: only a parameter that already had a .grad moves.
    assert metrics["frozen_from_start_moved"] == 0.0
    assert metrics["frozen_after_training_moved"] > 0.0
    assert metrics["phased_resume_max_abs_diff"] == 0.0
    assert metrics["head_only_delta_rebuild_max_abs_diff"] == 0.0
    assert metrics["full_delta_rebuild_max_abs_diff"] == 0.0
    assert metrics["head_only_delta_bytes"] < metrics["head_only_full_bytes"] / 5
    assert metrics["feature_hook_max_abs_diff"] == 0.0
    state_dict = torch.load(run.out_dir / artifacts["finetuned_model"], map_location="cpu",
                            weights_only=True)
    SmallCNN(num_classes=4).load_state_dict(state_dict)


def test_07_claims(default_run):
    run = default_run("07_distributed_training")
    metrics, artifacts = run.metrics, run.summary["artifacts"]
    assert metrics["reshard_max_abs_diff"] == 0.0
    assert metrics["reshard_optimizer_max_abs_diff"] == 0.0
    assert metrics["save_world_size"] != metrics["reshard_world_size"]
    assert metrics["ddp_ranks_max_abs_diff"] == 0.0
    assert metrics["dcp_files"] == metrics["save_world_size"]
    assert metrics["dcp_no_dist_max_abs_diff"] == 0.0
    assert metrics["dcp_async_max_abs_diff"] == 0.0
    assert metrics["dcp_to_torch_save_max_abs_diff"] == 0.0
    assert metrics["torch_save_to_dcp_max_abs_diff"] == 0.0
    assert metrics["full_to_fsdp_max_abs_diff"] == 0.0  # rank 0 read, broadcast, exact
    assert metrics["full_dict_entries_replaced_by_shards"] > 0  # set_model_state_dict's surprise
    assert metrics["prefix_strip_max_abs_diff"] == 0.0
    assert metrics["fsdp_buffer_gap_before_sync"] > 0.0  # the unsynced-buffer pitfall is real
    portable = torch.load(run.out_dir / artifacts["portable_model"], map_location="cpu",
                          weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in portable)
    SmallCNN().load_state_dict(portable)  # a plain single-process model, strict


def test_checkpoints_share_one_vocabulary(default_run):
    """01, 02, 06 and 07 write checkpoints with the collection's keys and rng sub-keys."""
    from torch.distributed.checkpoint import FileSystemReader

    from common.training import CHECKPOINT_KEYS

    rng_keys = {"python", "numpy", "torch", "loader"} | (
        {"cuda"} if torch.cuda.is_available() else set())
    checkpoints = []
    for stem, artifact in (("01_basic_save_load", "checkpoint"),
                           ("06_transfer_learning", "finetune_checkpoint")):
        run = default_run(stem)
        checkpoints.append(run.out_dir / run.summary["artifacts"][artifact])
    run = default_run("02_checkpoint_manager")
    checkpoints += sorted((run.out_dir / run.summary["artifacts"]["checkpoints"]).glob("*.pt"))
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert set(checkpoint) <= set(CHECKPOINT_KEYS), (path.name, set(checkpoint))
        assert set(checkpoint["rng"]) == rng_keys, path.name
    run = default_run("07_distributed_training")
    metadata = FileSystemReader(run.out_dir / run.summary["artifacts"]["dcp_checkpoint"]
                                ).read_metadata()
    assert {key.split(".")[0] for key in metadata.state_dict_metadata} == {"model", "optimizer"}
