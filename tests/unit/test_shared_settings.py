"""The table of torpor._sharing: what a run's savers share, and when two offers conflict."""

from __future__ import annotations

import pytest

from torpor._sharing import Offer, SharedSettings, reconcile, route_options
from torpor.crypto import Encryption


def offer(owner: str, **given: object) -> Offer:
    return Offer(owner, SharedSettings(**given))  # type: ignore[arg-type]


def test_nothing_offered_is_the_run_root_in_plaintext_replicated() -> None:
    assert reconcile([], "./checkpoints") == SharedSettings("./checkpoints", None, True)
    assert reconcile([offer("A"), offer("B")], "s3://b/p") == SharedSettings("s3://b/p", None, True)


def test_what_one_offers_is_the_runs() -> None:
    enc = Encryption(b"k" * 16, "SM4-CBC")
    shared = reconcile([offer("A", directory="s3://b/run"), offer("B", encryption=enc, integrated_save=False)],
                       "./checkpoints")
    assert shared == SharedSettings("s3://b/run", enc, False)


@pytest.mark.parametrize(("a", "b"), [("ck", "./ck/"), ("s3://b/p", "s3://b/p/"), ("/x/../ck", "/ck")])
def test_one_place_spelt_two_ways_is_no_conflict(a: str, b: str) -> None:
    assert reconcile([offer("A", directory=a), offer("B", directory=b)], "unused").directory == a


def test_the_same_key_twice_is_no_conflict_and_a_different_one_is() -> None:
    same = reconcile([offer("A", encryption=Encryption(b"k" * 16)), offer("B", encryption=Encryption(b"k" * 16))],
                     "d")
    assert same.encryption == Encryption(b"k" * 16)
    with pytest.raises(ValueError, match=r"^enc_key: A has one enc_key but B has a different enc_key"):
        reconcile([offer("A", encryption=Encryption(b"k" * 16)), offer("B", encryption=Encryption(b"j" * 16))], "d")


def test_route_options_sends_each_option_to_every_target_that_takes_it() -> None:
    def first(directory: str = "", name: str = "") -> None: ...

    def second(directory: str = "", prefix: str = "") -> None: ...

    assert route_options({"directory": "d", "name": "n", "prefix": "p"}, first, second, caller="f") == [
        {"directory": "d", "name": "n"}, {"directory": "d", "prefix": "p"}]
    with pytest.raises(TypeError, match=r"f\(\) got options no callback takes: 'nope'"):
        route_options({"nope": 1}, first, second, caller="f")
