"""The one collective of a training step: which facts the ranks agree on, and when.

Every rank must take the same decision at the same step boundary: stop (a signal reached one
rank), end the epoch (one rank's loader ran dry), save (a seconds interval fell due on one
rank's clock), give up (one rank's background save failed). Each starts as a fact of one
rank and becomes a fact of the job by an all-reduce MAX; they travel together in one small
vector, so a step costs **one** collective, not one per fact, and no rank is ever alone in
one (DESIGN §7 "No wait without a bound").

The vector, slot by slot (:class:`Fact`):

========================  ==========================================  ===============================
slot                      a rank sends                                MAX over ranks means
========================  ==========================================  ===============================
``STOP``                  the exit code it was asked for, 0 for none  the job's code (a signal's
                                                                      128+n beats the file's 75)
``EXHAUSTED``             1 if it has no next batch                   the epoch ends after this step
``SAVE_DUE``              1 if ``save_checkpoint_seconds`` passed     every rank saves now
                          on its clock
``SAVE_FAILED``           rank + 1 if its background save failed      every rank reports it (the
                                                                      highest failed rank is named)
``LENGTH_UNKNOWN``        epoch start: 1 if its loader has no         some rank's length is unknown
                          ``len``
``SHORTEST``              epoch start: minus its number of batches    minus the shortest rank's
========================  ==========================================  ===============================

The protocol, run by :class:`torpor.Loop` (``Model.train`` uses it too):

1. **Epoch start.** ``batches()`` fetches the epoch's first batch, then one collective of
   ``EXHAUSTED``, ``LENGTH_UNKNOWN`` and ``SHORTEST``: a rank with no batch at all ends the
   epoch on every rank before step 1, and when every rank knows its length, every rank knows
   the shortest one: the epoch has that many steps everywhere.
2. **Each step boundary** (``step_end``), *before* the callbacks' ``on_train_step_end``: the
   loop fetches the next batch (a one-batch lookahead, so "every rank has a next batch" is
   known before anyone enters the next step's forward and DDP's gradient all-reduce), asks
   each callback for its local facts (:meth:`torpor.Callback.step_facts`), adds its own
   ``EXHAUSTED`` and makes the one :func:`torpor._distributed.max_each` call. The result,
   an :class:`Agreed`, is ``run_context.original_args().agreed`` while the hooks run; callbacks
   act on it, never on their local facts, so every rank acts alike.
3. **When.** The collective runs at every step whose global number is a multiple of the
   smallest ``check_every_n_steps`` among the callbacks (default 1), and at *every* step of an
   epoch whose length some rank does not know, since only the bit can tell when a loader
   without ``len`` ends. Between checks ``agreed.checked`` is false: nothing is decided, and
   an epoch of agreed length ends after its agreed number of steps. A loader that ends
   before its own ``len`` between two checks is an error (``RuntimeError``), since the other
   ranks are already in the next step.

The lookahead has one consequence for exact resume: a checkpoint saved at step k's boundary
holds the generators' state *after* batch k+1 was fetched. Where fetching draws from the
global generators (random augmentation in the main process), a resume that is to match an
uninterrupted run bit for bit fetches batch k+1 before it restores that state; it can hand
``EpochFeed`` a :class:`Lookahead` that already holds the batch. ``Loop`` instead hands in a
``snapshot`` hook, called right before every fetch: the generators, and the ``state_dict()``
of a loader that keeps its own position (torchdata's ``StatefulDataLoader``), as they were
before batch k+1 was read. That is what a save at step k's boundary records, so the resumed
run reads batch k+1 again (``EpochFeed.before_held``). Such a loader is also read to its end
when the epoch ends (``run_out``), so that it records a finished epoch, as
``for batch in loader`` would have it.

Batches a longer rank has beyond the shortest one are not trained on (like ``drop_last``):
every rank trains the same steps and their losses count alike. One process (no process group,
or a world of one) agrees with itself at every step, without a collective.

Torch-free: the collective is handed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Fact(IntEnum):
    """A slot of the per-step vector (see the module's table)."""

    STOP = 0
    EXHAUSTED = 1
    SAVE_DUE = 2
    SAVE_FAILED = 3
    LENGTH_UNKNOWN = 4
    SHORTEST = 5


@dataclass(frozen=True)
class Agreed:
    """What every rank knows after a step boundary's collective."""

    checked: bool
    """Whether this boundary had a collective (or one process agreed with itself); when
    false, every other field is its default and nothing may be decided from it."""
    stop: int = 0
    """The job-wide exit code requested, 0 for none."""
    exhausted: bool = False
    """Some rank has no next batch: the epoch ends after this step on every rank."""
    save_due: bool = False
    """A ``save_checkpoint_seconds`` interval fell due on some rank's clock."""
    save_failed_rank: int | None = None
    """A rank whose background save failed (the highest such), or ``None``."""
    length: int | None = None
    """At an epoch start: the shortest rank's number of batches, ``None`` if some rank's is unknown."""


UNCHECKED = Agreed(checked=False)


def merge(*facts: Mapping[Fact, int]) -> dict[Fact, int]:
    """Several contributors' local facts as one: the largest value of each slot."""
    out: dict[Fact, int] = {}
    for mapping in facts:
        for fact, value in mapping.items():
            out[Fact(fact)] = max(out.get(Fact(fact), 0), int(value))
    return out


def encode(facts: Mapping[Fact, int]) -> list[int]:
    """The vector a rank sends; slots it has no fact for are 0."""
    return [int(facts.get(fact, 0)) for fact in Fact]


def decode(vector: Sequence[int]) -> Agreed:
    """The element-wise MAX over ranks (or one rank's own vector) as decisions."""
    v = {fact: int(vector[fact]) for fact in Fact}
    return Agreed(
        checked=True,
        stop=v[Fact.STOP],
        exhausted=v[Fact.EXHAUSTED] > 0,
        save_due=v[Fact.SAVE_DUE] > 0,
        save_failed_rank=v[Fact.SAVE_FAILED] - 1 if v[Fact.SAVE_FAILED] > 0 else None,
        length=None if v[Fact.LENGTH_UNKNOWN] else -v[Fact.SHORTEST],
    )


def collective_due(step: int, every: int, length_agreed: bool) -> bool:
    """Whether global step ``step``'s boundary needs the collective (protocol point 3)."""
    return not length_agreed or step % every == 0


class Lookahead:
    """An iterator read one item ahead, so that "is there a next one" is known before it is needed."""

    _NOTHING = object()

    def __init__(self, iterator: Iterator[Any], snapshot: Callable[[], Any] | None = None) -> None:
        self._iterator = iterator
        self._next: Any = self._NOTHING
        self._snapshot = snapshot
        self.exhausted = False
        """Whether the iterator has ended (and nothing is held)."""
        self.before_held: Any = None
        """``snapshot()`` taken just before the held item was read, while one is held.

        What a checkpoint of the steps trained so far must record as the generators' state:
        reading the item ahead may draw random numbers (augmentation in ``__getitem__``), and a
        resumed run reads that item again, from this state."""

    def fetch(self) -> None:
        """Read the next item unless one is held or the iterator has ended."""
        if self._next is not self._NOTHING or self.exhausted:
            return
        before = self._snapshot() if self._snapshot is not None else None
        try:
            self._next = next(self._iterator)
        except StopIteration:
            self.exhausted = True
            return
        self.before_held = before

    def run_out(self) -> None:
        """Drop the held item and read the iterator to its end.

        What ``for batch in loader`` does at an epoch's end, and what a loader that keeps its
        own position needs to record that the epoch is over (torchdata's ``StatefulDataLoader``
        marks an iterator finished only when it raised ``StopIteration``; a finished one is
        followed by a new epoch, an unfinished one is continued after a resume)."""
        self._next = self._NOTHING
        self.before_held = None
        while not self.exhausted:
            self.fetch()
            self._next = self._NOTHING

    def take(self) -> Any:
        """The held item (fetched first if needed); ``StopIteration`` if there is none."""
        self.fetch()
        if self._next is self._NOTHING:
            raise StopIteration
        item, self._next = self._next, self._NOTHING
        self.before_held = None
        return item


class EpochFeed:
    """One epoch's batches, handed out only as far as every rank has them.

    Owned by ``Loop.batches`` (which calls :meth:`begin` and :meth:`take`); ``Loop.step_end``
    calls :meth:`boundary` before the step's ``on_train_step_end`` hooks. ``reduce`` is the
    element-wise MAX over ranks (``_distributed.max_each``); ``facts`` gathers the callbacks'
    local facts, and is called only at boundaries that have a collective.

    With ``run_out``, the iterator is read to its end (:meth:`Lookahead.run_out`) as soon as
    the epoch ends on every rank, before that boundary's hooks save anything: for a loader that
    keeps its own position, which must record a finished epoch whether the epoch ended by its
    agreed length, by another rank's last batch, or by its own end. The batches read there are
    not trained on (a longer rank's surplus).
    """

    def __init__(self, iterator: Iterator[Any] | Lookahead, *, length: int | None, every: int, distributed: bool,
                 reduce: Callable[[Sequence[int]], Sequence[int]],
                 facts: Callable[[], Mapping[Fact, int]], snapshot: Callable[[], Any] | None = None,
                 run_out: bool = False) -> None:
        self._ahead = iterator if isinstance(iterator, Lookahead) else Lookahead(iterator, snapshot)
        self._run_out = run_out
        self._own_length = length
        self._every = every
        self._distributed = distributed
        self._reduce = reduce
        self._facts = facts
        self._boundary_step: int | None = None
        self._ended = False
        self.length: int | None = None
        """The epoch's agreed number of batches (the shortest rank's), once :meth:`begin` ran."""
        self.agreed: Agreed = UNCHECKED
        """The last boundary's agreement."""

    def _agree(self, local: Mapping[Fact, int]) -> Agreed:
        vector = encode(local)
        return decode(self._reduce(vector) if self._distributed else vector)

    def begin(self, step_in_epoch: int) -> None:
        """The epoch-start collective (protocol point 1); ``step_in_epoch`` is where a resumed epoch stands."""
        self._ahead.fetch()
        local = {Fact.EXHAUSTED: int(self._ahead.exhausted)}
        if self._own_length is None:
            local[Fact.LENGTH_UNKNOWN] = 1
        else:
            local[Fact.SHORTEST] = -self._own_length
        agreed = self._agree(local)
        self.length = agreed.length
        self._end_if(agreed.exhausted or (self.length is not None and step_in_epoch >= self.length))

    def boundary(self, step: int, step_in_epoch: int) -> Agreed:
        """The boundary after global step ``step`` (protocol point 2); once per step."""
        if self._boundary_step == step:
            return self.agreed
        self._boundary_step = step
        last = self.length is not None and step_in_epoch >= self.length
        if not last:
            self._ahead.fetch()
        if not self._distributed or collective_due(step, self._every, self.length is not None):
            exhausted = int(last or self._ahead.exhausted)
            self.agreed = self._agree(merge(self._facts(), {Fact.EXHAUSTED: exhausted}))
        else:
            if self._ahead.exhausted and not last:
                raise RuntimeError(
                    f"the loader ended after {step_in_epoch} batches, before the {self.length} its len() "
                    "promised (and the ranks agreed on); the other ranks cannot learn it before the next "
                    "check: give it a true len(), or check every step (check_every_n_steps=1)")
            self.agreed = UNCHECKED
        self._end_if(last or self.agreed.exhausted)
        return self.agreed

    def _end_if(self, ended: bool) -> None:
        self._ended = ended
        if ended and self._run_out:
            self._ahead.run_out()

    @property
    def ended(self) -> bool:
        """Whether the epoch has ended on every rank (no further batch will be handed out)."""
        return self._ended

    @property
    def before_held(self) -> Any:
        """The generators' snapshot from before the batch read ahead and not trained yet, or ``None``."""
        return self._ahead.before_held

    def take(self) -> tuple[bool, Any]:
        """``(True, batch)`` for the next step, or ``(False, None)`` when the epoch ends on every rank."""
        if self._ended:
            return False, None
        return True, self._ahead.take()
