"""Unit tests of 05's pieces: trace vs script divergence, torch.export failure and fix."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import load_script

lesson = load_script("05_torchscript_export")


def test_tracing_bakes_in_one_branch_and_scripting_keeps_both():
    gate = lesson.SignGate()
    positive, negative = torch.rand(3, 8) + 0.1, -torch.rand(3, 8) - 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(gate, positive)
        scripted = torch.jit.script(gate)
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    assert torch.equal(traced(positive), gate(positive))
    assert not torch.allclose(traced(negative), gate(negative))  # silently wrong
    assert torch.equal(traced(negative), negative * 2)  # the positive branch, baked in
    assert torch.equal(scripted(negative), gate(negative))
    assert torch.equal(scripted(positive), gate(positive))


def test_export_rejects_value_dependent_if_and_accepts_torch_cond(capsys):
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(lesson.SignGate(), (torch.rand(4, 8),))
    program = torch.export.export(lesson.SignGateCond(), (torch.rand(4, 8),))
    for sign in (1.0, -1.0):
        inputs = sign * (torch.rand(4, 8) + 0.1)
        assert torch.equal(program.module()(inputs), lesson.SignGate()(inputs))


def test_jit_deprecation_filter_is_narrow():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lesson.jit_deprecation_filtered():
            torch.jit.script(lesson.SignGate())
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        inside = [str(w.message) for w in caught]
        torch.jit.script(lesson.SignGate())  # outside the block the notice shows again
    assert inside == ["something else is deprecated"]
    assert any("torch.jit.script` is deprecated" in str(w.message) for w in caught[1:])
