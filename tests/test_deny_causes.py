"""Every refusal reason has its own Q.850 cause on both PBXes, and the same one."""

from __future__ import annotations

from agent.adapters.asterisk.adapter import DENY_CAUSES as ASTERISK_CAUSES
from agent.adapters.asterisk.translate import cause_name
from agent.adapters.freeswitch.commands import DENY_CAUSES as FREESWITCH_CAUSES
from agent.core.events import DenyReason


def test_every_deny_reason_has_a_cause_and_both_pbxes_send_the_same_one() -> None:
    assert set(ASTERISK_CAUSES) == set(DenyReason) == set(FREESWITCH_CAUSES)  # a new reason needs both
    for reason in DenyReason:
        assert cause_name(ASTERISK_CAUSES[reason], "") == FREESWITCH_CAUSES[reason], reason
