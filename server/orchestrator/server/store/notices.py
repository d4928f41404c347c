"""What one replica tells the others, sent with the commit it is about (PostgreSQL NOTIFY).

One typed message instead of lists taken apart by index. On the wire each notice is still
the JSON list it always was (`["control", run_id, status]`...), so replicas of the previous
release and this one understand each other during a rolling deploy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from orchestrator.server.store.records import Answer


class NoticeKind(enum.Enum):
    """What happened."""

    CHANGE = "change"  # a run changed (watchers read the store)
    CONTROL = "control"  # a control call moved a run to `status`
    ANSWER = "answer"  # a clarification of a run was answered
    SIGNAL = "signal"  # a signal was sent to a run
    CLAIM = "claim"  # runs are free to claim
    WEBHOOKS = "webhooks"  # a tenant's webhook subscriptions changed
    RESYNC = "resync"  # the listener reconnected: messages may have been missed


@dataclass(frozen=True)
class Notice:
    """One message between replicas."""

    kind: NoticeKind
    run_id: str = ""
    tenant_id: str = ""  # CHANGE, WEBHOOKS
    status_changed: bool = False  # CHANGE
    status: str = ""  # CONTROL: the run's new status
    clarification_id: str = ""  # ANSWER
    answer: Answer | None = None  # ANSWER
    signal_name: str = ""  # SIGNAL

    @classmethod
    def answered(cls, run_id: str, clarification_id: str, answer: Answer) -> Notice:
        return cls(NoticeKind.ANSWER, run_id, clarification_id=clarification_id, answer=answer)

    @classmethod
    def signalled(cls, run_id: str, signal_name: str) -> Notice:
        return cls(NoticeKind.SIGNAL, run_id, signal_name=signal_name)

    def to_json(self) -> list[Any]:
        kind = self.kind.value
        if self.kind is NoticeKind.CHANGE:
            return [kind, self.run_id, self.tenant_id, int(self.status_changed)]
        if self.kind is NoticeKind.CONTROL:
            return [kind, self.run_id, self.status]
        if self.kind is NoticeKind.ANSWER:
            assert self.answer is not None
            return [kind, self.run_id, self.clarification_id, self.answer.to_json()]
        if self.kind is NoticeKind.SIGNAL:
            return [kind, self.run_id, self.signal_name]
        if self.kind is NoticeKind.WEBHOOKS:
            return [kind, self.tenant_id]
        return [kind]

    @classmethod
    def from_json(cls, data: list[Any]) -> Notice:
        """A notice from its wire form; ValueError (or its kin) when it is not one."""
        kind = NoticeKind(data[0])
        if kind is NoticeKind.CHANGE:
            _, run_id, tenant_id, changed = data
            return cls(kind, str(run_id), tenant_id=str(tenant_id), status_changed=bool(changed))
        if kind is NoticeKind.CONTROL:
            _, run_id, status = data
            return cls(kind, str(run_id), status=str(status))
        if kind is NoticeKind.ANSWER:
            _, run_id, clarification_id, answer = data
            return cls.answered(str(run_id), str(clarification_id), Answer.from_json(answer))
        if kind is NoticeKind.SIGNAL:
            _, run_id, signal_name = data
            return cls.signalled(str(run_id), str(signal_name))
        if kind is NoticeKind.WEBHOOKS:
            _, tenant_id = data
            return cls(kind, tenant_id=str(tenant_id))
        return cls(kind)
