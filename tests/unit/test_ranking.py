"""Competition ranking by earnings: 1 + the number with strictly more.

See docs/protocol.md, "SQL tables".
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from usermgmt.domain.ranking import competition_ranks

EARNINGS = st.dictionaries(
    st.text(min_size=1, max_size=6), st.integers(0, 1_000_000_000), max_size=60
)
# Few distinct values, so ties are common.
TIED_EARNINGS = st.dictionaries(st.integers(0, 500), st.sampled_from([0, 10, 150, 10**9]))


def test_ties_share_a_rank_and_the_next_rank_skips() -> None:
    ranks = competition_ranks({"a": 100, "b": 50, "c": 50, "d": 10, "e": 0, "f": 0})
    assert ranks == {"a": 1, "b": 2, "c": 2, "d": 4, "e": 5, "f": 5}


def test_everyone_equal_ranks_first() -> None:
    assert competition_ranks({"a": 0, "b": 0, "c": 0}) == {"a": 1, "b": 1, "c": 1}


def test_no_players_no_ranks() -> None:
    assert competition_ranks({}) == {}


@given(EARNINGS)
def test_rank_is_one_plus_the_number_with_strictly_more(earnings: dict[str, int]) -> None:
    ranks = competition_ranks(earnings)
    assert ranks.keys() == earnings.keys()
    for key, value in earnings.items():
        assert ranks[key] == 1 + sum(1 for other in earnings.values() if other > value)


@given(TIED_EARNINGS)
def test_ranks_with_many_ties(earnings: dict[int, int]) -> None:
    ranks = competition_ranks(earnings)
    for key, value in earnings.items():
        assert ranks[key] == 1 + sum(1 for other in earnings.values() if other > value)
        for other, other_value in earnings.items():
            # Equal earnings share a rank; more earnings is a strictly better rank.
            assert (ranks[key] == ranks[other]) == (value == other_value)
            assert (ranks[key] < ranks[other]) == (value > other_value)


@given(EARNINGS)
def test_ranks_are_between_one_and_the_number_of_players(earnings: dict[str, int]) -> None:
    ranks = competition_ranks(earnings)
    if earnings:
        assert min(ranks.values()) == 1
        assert max(ranks.values()) <= len(earnings)
        # The highest rank number is held by every player with the lowest earnings.
        lowest = min(earnings.values())
        assert max(ranks.values()) == 1 + sum(1 for v in earnings.values() if v > lowest)
