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
