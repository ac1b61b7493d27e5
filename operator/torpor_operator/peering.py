"""Whether this replica may act, read from kopf's peering records with kopf's own rule.

kopf pauses a replica while another live replica has a higher or equal priority: it stops the
replica's watches, so no handler runs — but it tells no one. Work the shell starts by itself
(reconciles scheduled for later, the retention loop) would go on in a paused replica, so a
replica that was acting and is then outranked would keep acting on the jobs it knew. The
shell asks :func:`blockers` before such work.

A record, as kopf writes it into the peering object's ``status`` under the replica's identity:
``{"priority": int, "lifetime": seconds, "lastseen": ISO 8601}``. kopf reads a missing
priority as 0, a missing lifetime as 60 s, a missing ``lastseen`` as now; so does this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

__all__ = ["blockers"]


def blockers(records: Mapping[str, Any], identity: str, priority: int, now: datetime) -> list[str]:
    """Identities of the live replicas that make kopf pause the replica ``identity``.

    A replica blocks when its record is alive (``lastseen + lifetime`` is after ``now``) and its
    priority is higher than or equal to ``priority`` (kopf pauses both sides of a tie).

    Args:
        records: the peering object's ``status``.
        identity: this replica's identity (kopf's, ``POD_ID``); its own record never blocks.
        priority: this replica's priority.
        now: an aware datetime.

    Example:
        >>> from datetime import UTC
        >>> now = datetime(2025, 1, 1, tzinfo=UTC)
        >>> blockers({"a": {"priority": 5, "lifetime": 60, "lastseen": "2025-01-01T00:00:00+00:00"},
        ...           "b": {"priority": 1}}, "b", 1, now)
        ['a']
    """
    found = []
    for other, record in sorted(records.items()):
        if other == identity or not isinstance(record, Mapping):
            continue
        try:
            lastseen = datetime.fromisoformat(record["lastseen"]) if record.get("lastseen") else now
            deadline = lastseen + timedelta(seconds=int(record.get("lifetime", 60)))
            blocks = deadline > now and int(record.get("priority", 0)) >= priority
        except (TypeError, ValueError):  # e.g. a naive lastseen
            blocks = True  # unreadable: rather pause than act beside a replica that may be alive
        if blocks:
            found.append(other)
    return found
