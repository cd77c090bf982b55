"""Attacker's pass on four-eyes: the preparer under another spelling of their own name."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_four_eyes import big, four_eyes_over_five, team  # noqa: F401


# The preparer under another spelling of their own name ("Ana " or "ANA", or with a zero-width
# space) counted as a second operator and approved their own batch.
@pytest.mark.parametrize("spelling", [" ana", "ANA", "ana\u200b", "\uff41na"])
def test_operator_name_is_one_name_however_spelled(spelling: str) -> None:
    from services.settings import ReconSettings
    try:
        settings = ReconSettings(operator=spelling)
    except ValueError as error:  # refused outright is fine too: said in one line
        assert "operator" in str(error)
        return
    from services.completion.approvals import same_operator
    assert same_operator(settings.operator, "ana")


async def test_the_preparer_under_another_case_cannot_approve(team: Any) -> None:  # noqa: F811
    from services.errors import ApprovalRefused
    batch_id = team.ana.prepare_batch(big(team, 0, 8)).batch_id
    team.ben.settings = team.ben.settings.model_copy(update={"operator": "ANA"})
    with pytest.raises(ApprovalRefused, match=r"another operator"):
        team.ben.decide_batch(batch_id, True, "me again")
