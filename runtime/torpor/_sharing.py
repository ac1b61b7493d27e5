"""What every saver of one run shares: the checkpoint directory, the cipher, the layout.

A run's ``OnRequestExit`` and its ``CheckpointMonitor`` (one or several) write checkpoints
that one resume reads, so they must agree on *where* (one directory, so ``'latest'`` sees
the exit save beside the periodic ones), *how they are sealed* (a key given to either seals
every checkpoint, and a resume with that key refuses plaintext) and *how model state is laid
out* (``integrated_save``: sharded state written as if replicated keeps only rank 0's shard).
:class:`torpor.Loop` applies one rule when it is built, the table below:

===================  ===================================  ==========================
setting              a callback offers it when it was      when no callback offers it
                     given (``from_env``: when set)
===================  ===================================  ==========================
``directory``        ``directory=``                        the run's checkpoint root:
                     (``TORPOR_CHECKPOINT_URI``)           ``TORPOR_CHECKPOINT_URI`` or
                                                           ``./checkpoints``
cipher               ``enc_key=`` with its ``enc_mode``    plaintext
                     (``TORPOR_ENC_KEY*``, ``_MODE``)
``integrated_save``  a monitor always (its seed default    ``True``
                     is ``True``); ``OnRequestExit`` when
                     given
===================  ===================================  ==========================

Every saver that offered nothing adopts what another offered. Two offers that differ are a
``ValueError`` naming both callbacks and both values (never a key): silently preferring one
would write part of the run's checkpoints where, or how, its resume does not look.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torpor.crypto import Encryption


@dataclass(frozen=True)
class SharedSettings:
    """The settings one run's savers share; ``None`` in an offer means "not given"."""

    directory: str | None = None
    """Checkpoint root every saver writes to and the resume reads."""
    encryption: Encryption | None = None
    """Cipher of every file the run writes; ``None``: plaintext."""
    integrated_save: bool | None = None
    """Replicated model state written once, by rank 0 (``False``: every rank its own)."""


@dataclass(frozen=True)
class Offer:
    """What one callback was given, and how an error message names that callback."""

    owner: str
    """E.g. ``OnRequestExit`` or ``CheckpointMonitor(prefix='CKP')``."""
    settings: SharedSettings


@runtime_checkable
class SharesSettings(Protocol):
    """A callback that writes checkpoints: it offers its settings and adopts the run's."""

    def shared_offer(self) -> Offer:
        """The settings this callback was given (not those it adopted)."""

    def adopt_shared(self, settings: SharedSettings) -> None:
        """Use the run's settings wherever this callback was given none."""


def _place(directory: str) -> str:
    """A directory's identity for comparison: ``x``, ``./x`` and ``x/`` are one place."""
    if "://" in directory:
        return directory.rstrip("/")
    return os.path.normpath(os.path.abspath(directory))


def _conflict(setting: str, first: Offer, second: Offer, first_value: str, second_value: str, why: str) -> ValueError:
    return ValueError(
        f"{setting}: {first.owner} has {first_value} but {second.owner} has {second_value}; the callbacks of one "
        f"run share it ({why}); give it to one of them, or the same to both"
    )


def _cipher_text(enc: Encryption) -> str:
    return f"an enc_key with enc_mode={enc.mode!r}"  # never the key


def reconcile(offers: Sequence[Offer], default_directory: str) -> SharedSettings:
    """The run's settings from its callbacks' offers (pure; the module table).

    Raises:
        ValueError: two offers of one setting differ; the message names both callbacks.
    """
    directory: tuple[Offer, str] | None = None
    encryption: tuple[Offer, Encryption] | None = None
    integrated: tuple[Offer, bool] | None = None
    for offer in offers:
        given = offer.settings
        if given.directory is not None:
            if directory is None:
                directory = (offer, given.directory)
            elif _place(directory[1]) != _place(given.directory):
                raise _conflict("directory", directory[0], offer, repr(directory[1]), repr(given.directory),
                                "a resume reads one directory")
        if given.encryption is not None:
            if encryption is None:
                encryption = (offer, given.encryption)
            elif encryption[1].mode != given.encryption.mode:
                raise _conflict("enc_mode", encryption[0], offer, _cipher_text(encryption[1]),
                                _cipher_text(given.encryption), "a resume opens every checkpoint with one key")
            elif encryption[1].key != given.encryption.key:
                raise _conflict("enc_key", encryption[0], offer, "one enc_key", "a different enc_key",
                                "a resume opens every checkpoint with one key")
        if given.integrated_save is not None:
            if integrated is None:
                integrated = (offer, given.integrated_save)
            elif integrated[1] != given.integrated_save:
                raise _conflict("integrated_save", integrated[0], offer, repr(integrated[1]),
                                repr(given.integrated_save), "one layout of the model state, replicated or sharded")
    return SharedSettings(
        directory=directory[1] if directory is not None else default_directory,
        encryption=encryption[1] if encryption is not None else None,
        integrated_save=integrated[1] if integrated is not None else True,
    )


def share_settings(callbacks: Iterable[object], default_directory: str) -> SharedSettings:
    """Reconcile the savers among ``callbacks`` and make each adopt the result.

    Raises:
        ValueError: see :func:`reconcile`.
    """
    savers = [cb for cb in callbacks if isinstance(cb, SharesSettings)]
    settings = reconcile([cb.shared_offer() for cb in savers], default_directory)
    for cb in savers:
        cb.adopt_shared(settings)
    return settings


def route_options(options: Mapping[str, Any], *targets: Any, caller: str) -> list[dict[str, Any]]:
    """Split keyword options among constructors by the parameters each accepts.

    An option several targets take (``directory``, ``enc_key``…) goes to each of them.

    Raises:
        TypeError: an option no target takes, named with ``caller``.
    """
    accepted = [set(inspect.signature(target).parameters) for target in targets]
    unknown = sorted(name for name in options if not any(name in names for names in accepted))
    if unknown:
        names = ", ".join(t.__name__ for t in targets)
        raise TypeError(f"{caller}() got options no callback takes: {', '.join(map(repr, unknown))} "
                        f"(each option goes to whichever of {names} accepts it)")
    return [{k: v for k, v in options.items() if k in names} for names in accepted]
