"""Which of the objects labelled with a job's name are the job's own (pure).

The operator lists a job's pods and children by the label ``torpor.dev/job=NAME``, and names
them deterministically (``<job>-<incarnation>-<rank>``…). Neither tells two jobs of the same
name apart: a TrainingJob deleted with ``kubectl delete --cascade=orphan`` leaves its children
without an owner reference, one deleted in the background leaves them owned by its old uid
until the garbage collector gets to them, and a job created again under that name would see
them as its own — old Succeeded pods finishing it before it ran, an old ``GracefulExit: 1``
stopping its ranks. Only the controller reference's uid says whose a child is.

So a job decides from, and acts on, only what it controls (:func:`controlled_by`). What an
earlier job of its name left (:class:`Stale`) is never deleted, patched or adopted: the garbage
collector deletes what an owner still holds, and orphans stay, as the user who orphaned them
asked, until the user deletes them. They only hold names: an incarnation whose names are taken
is skipped (:func:`free_incarnation`), so the new job starts at the first free one and says so
in a Warning Event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torpor_operator.contract import LABEL_INCARNATION, LABEL_JOB
from torpor_operator.decisions import Event

__all__ = ["Stale", "controlled_by", "free_incarnation", "incarnation_of", "stale_objects"]

#: How many of the stale objects a Warning names; the rest are counted.
_NAMED = 6


def controlled_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``obj``'s controller reference names the object with ``uid`` (never for an empty uid)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(r.get("uid") == uid and r.get("controller") for r in refs)


def incarnation_of(obj: Mapping[str, Any]) -> int | None:
    """The ``torpor.dev/incarnation`` label as a number, or ``None``."""
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {})[LABEL_INCARNATION])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Stale:
    """An object labelled with the job's name that the job does not control."""

    kind: str
    name: str
    incarnation: int | None
    owner: str | None
    """The uid in its controller reference; ``None``: orphaned (no controller)."""


def stale_objects(objects: Iterable[Mapping[str, Any]], job: str, uid: str, kind: str = "") -> list[Stale]:
    """The objects labelled ``torpor.dev/job=job`` that the job with ``uid`` does not control.

    ``kind`` names objects that do not say theirs (the items of a pod list carry no ``kind``).
    """
    found = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        if (meta.get("labels") or {}).get(LABEL_JOB) != job or controlled_by(obj, uid):
            continue
        owner = next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
        found.append(Stale(obj.get("kind") or kind, meta.get("name", ""), incarnation_of(obj), owner))
    return found


def free_incarnation(wanted: int, own: Iterable[int], stale: Iterable[Stale], job: str) -> tuple[int, Event | None]:
    """The incarnation a launch of ``wanted`` uses, and the Warning that says why when it is not ``wanted``.

    Args:
        wanted: the next incarnation (1 for a new job).
        own: incarnations of the job's own pods and children. One at ``wanted`` or above is a
            half-applied launch (the operator died before the status patch): it is finished
            where it began, even if the objects that made it skip ahead are gone since.
        stale: what an earlier job of the name left; an incarnation any of it is labelled with is
            taken (its names would meet those objects).
        job: the job's name, for the message.
    """
    begun = [n for n in own if n >= wanted]
    if begun:
        return min(begun), None
    stale = list(stale)
    taken = {s.incarnation for s in stale}
    chosen = wanted
    while chosen in taken:
        chosen += 1
    if chosen == wanted:
        return wanted, None
    skipped = f"incarnation {wanted}" if chosen == wanted + 1 else f"incarnations {wanted}-{chosen - 1}"
    holding = sorted((s for s in stale if s.incarnation is not None and wanted <= s.incarnation < chosen),
                     key=lambda s: (s.incarnation, s.kind, s.name))
    named = ", ".join(f"{s.kind or 'object'} {s.name}" for s in holding[:_NAMED])
    named += f" and {len(holding) - _NAMED} more" if len(holding) > _NAMED else ""
    owners = sorted({f"owner uid {s.owner}" for s in holding if s.owner} | {"orphaned" for s in holding if not s.owner})
    their = "its" if chosen == wanted + 1 else "their"
    message = (f"{skipped} skipped: {their} names are held by objects an earlier TrainingJob {job} left "
               f"({'; '.join(owners)}): {named}. They are not this job's and torpor leaves them alone: the garbage "
               "collector deletes those an owner still holds; orphans stay until you delete them")
    return chosen, Event("Warning", "StaleChildren", message)
