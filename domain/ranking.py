"""Competition ranking by earnings: 1 + the number with strictly more.

The rule in one place. The worker computes ranks in SQL (`RANK() OVER (ORDER BY
earnings DESC)` in `persistence/ranking.py`) and live from the leaderboard sorted set
(`ZCOUNT` of higher scores, `persistence/cache.py`); the tests check both against
`competition_ranks`. See docs/protocol.md, "SQL tables".
"""

from __future__ import annotations

from collections.abc import Mapping
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
