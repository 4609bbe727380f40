"""Schedule names: one table of names and aliases, and one default."""

from __future__ import annotations

import pytest

from partition.errors import PlanError
from partition.schedules.actions import SCHEDULES, build_schedule
from partition.schedules.names import DEFAULT_SCHEDULE, SCHEDULE_NAMES, canonical_schedule


def test_one_table_of_schedule_names() -> None:
    from partition.schedules.names import canonical_schedule

    for alias in ("zero-bubble", "zbh1", "interleaved-1f1b", "pipedream-flush", "ZB_H1"):
        assert build_schedule(alias, 2, 4, 2 if "interleaved" in alias else 1).name == (
            canonical_schedule(alias)
        )


def test_the_names_are_the_schedules_built() -> None:
    assert tuple(SCHEDULES) == SCHEDULE_NAMES and DEFAULT_SCHEDULE in SCHEDULE_NAMES
    for name in SCHEDULE_NAMES:
        assert canonical_schedule(name) == name
        assert build_schedule(name, 2, 4, 2 if name == "interleaved" else 1).name == name


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        (" One_F_One_B ", "1f1b"),
        ("PipeDream-Flush", "1f1b"),
        ("zero_bubble", "zb-h1"),
        ("Interleaved_1F1B", "interleaved"),
        ("GPIPE", "gpipe"),
    ],
)
def test_aliases_ignore_case_spaces_and_underscores(alias: str, name: str) -> None:
    assert canonical_schedule(alias) == name


def test_an_unknown_name_lists_the_names() -> None:
    with pytest.raises(PlanError, match=r"unknown schedule 'dualpipe'; choose one of gpipe, 1f1b, "
                       r"interleaved, zb-h1"):  # fmt: skip
        canonical_schedule("dualpipe")
