"""Printed comparison words are chosen by code from the measured figures: each wording
function is called with the figures one way and then swapped, and the word turns."""

from __future__ import annotations

from common.verdict import relation, size_word, speed_word
from tests.conftest import load_script


def test_relation_words_turn_with_the_figures():
    words = ("more", "same", "less")
    assert relation(2.0, 1.0, words) == "more" and relation(1.0, 2.0, words) == "less"
    assert relation(1.05, 1.0, words) == "same" and relation(0.0, 0.0, words) == "same"
    assert speed_word(5.0, 10.0) == "faster than" and speed_word(10.0, 5.0) == "slower than"
    assert size_word(10, 11) == "smaller than" and size_word(11, 10) == "larger than"
    assert size_word(10, 10) == "the same size as"


def test_dcp_threads_wording_follows_the_measurement():
    lesson = load_script("02_checkpoint_manager")
    # 0.74 GB/s with 1 thread, 0.63 with 2 (a real run): the second thread did not help.
    slower = lesson.threads_verdict(one_thread_ms=90.0, two_threads_ms=106.0)
    faster = lesson.threads_verdict(one_thread_ms=106.0, two_threads_ms=90.0)
    assert "slower than" in slower and "does not help" in slower
    assert "faster than" in faster and "helps" in faster
    assert "no difference" in lesson.threads_verdict(100.0, 103.0)


def test_export_with_cpu_copy_keeps_the_device_program_apart():
    """move_to_device_pass works in place; the CPU copy must be a separate program, so
    moving it (here to the meta device) leaves the program kept for AOTInductor alone."""
    import torch
    from torch.export.passes import move_to_device_pass

    lesson = load_script("05_torchscript_export")
    model = torch.nn.Linear(3, 2)
    program, cpu_program = lesson.export_with_cpu_copy(model, (torch.randn(2, 3),))
    assert program is not cpu_program
    assert move_to_device_pass(cpu_program, "meta") is cpu_program  # the pitfall is real
    assert lesson.program_devices(cpu_program) == ["meta"]
    assert lesson.program_devices(program) == ["cpu"]


def test_the_printed_jit_notice_category_is_the_caught_one():
    """torch 2.10-2.12 (DeprecationWarning), 2.14 (FutureWarning), and 2.14 on Python 3.14+
    (another message): the category printed is the one caught, and the filter hides both
    messages and nothing else."""
    import warnings

    lesson = load_script("05_torchscript_export")
    deprecated = "`torch.jit.script` is deprecated. Please switch to `torch.compile`."
    py314 = "`torch.jit.script` is not supported in Python 3.14+ and may break. Please switch."
    for message, category in ((deprecated, DeprecationWarning), (deprecated, FutureWarning),
                              (py314, FutureWarning)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.warn("unrelated", UserWarning, stacklevel=1)
            warnings.warn(message, category, stacklevel=1)
            with lesson.jit_deprecation_filtered():
                warnings.warn(message, category, stacklevel=1)
                warnings.warn("`torch.jit.script` is fine", category, stacklevel=1)
        assert lesson.jit_notice(caught) == category.__name__
        assert [str(w.message) for w in caught[2:]] == ["`torch.jit.script` is fine"]
    assert lesson.jit_notice([]) == "no warning"


def test_deterministic_kernels_sets_the_cuda_flags_and_puts_them_back(monkeypatch):
    """The CUDA branch only flips flags (no GPU needed to check it); the CPU one is a no-op."""
    import os

    import torch

    lesson = load_script("06_transfer_learning")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
              cudnn.benchmark)
    with lesson.deterministic_kernels(torch.device("cpu")):
        assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
                cudnn.benchmark) == before
    with lesson.deterministic_kernels(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled() is True
        assert cudnn.deterministic is True and cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
            cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
