"""Comparison words chosen from the measured figures, so a printed sentence turns when the
measurement does ("faster", "smaller", "help" never come from memory)."""

from __future__ import annotations

SAME_WITHIN = 0.10  # relative gap under which two measurements read as "about the same"


def relation(value: float, reference: float, words: tuple[str, str, str],
             same_within: float = SAME_WITHIN) -> str:
    """``words[0]`` when ``value`` exceeds ``reference`` by more than ``same_within`` of the
    larger, ``words[2]`` when it falls short by as much, ``words[1]`` in between."""
    scale = max(abs(value), abs(reference))
    if scale == 0 or abs(value - reference) <= same_within * scale:
        return words[1]
    return words[0] if value > reference else words[2]


def speed_word(ms: float, reference_ms: float, same_within: float = SAME_WITHIN) -> str:
    """'faster than', 'about as fast as' or 'slower than', for two times in ms (less is
    faster)."""
    return relation(ms, reference_ms, ("slower than", "about as fast as", "faster than"),
                    same_within)


def size_word(size: float, reference: float, same_within: float = 0.0) -> str:
    """'larger than', 'the same size as' or 'smaller than'; by default any byte counts."""
    return relation(size, reference, ("larger than", "the same size as", "smaller than"),
                    same_within)
