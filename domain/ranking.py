"""Competition ranking by earnings: 1 + the number with strictly more.

See docs/protocol.md, "SQL tables".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

K = TypeVar("K")


def competition_ranks(earnings: Mapping[K, int]) -> dict[K, int]:
    """Rank every key by earnings, highest first; ties share a rank ("1224" ranking)."""
    ordered = sorted(earnings.items(), key=lambda item: item[1], reverse=True)
    ranks: dict[K, int] = {}
    previous: int | None = None
    rank = 0
    for position, (key, value) in enumerate(ordered, start=1):
        if value != previous:
            rank, previous = position, value
        ranks[key] = rank
    return ranks


def rank_of(value: int, all_earnings: Iterable[int]) -> int:
    """The competition rank that `value` would have among `all_earnings`."""
    return 1 + sum(1 for other in all_earnings if other > value)
