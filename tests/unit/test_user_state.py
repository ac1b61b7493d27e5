"""``state=`` as data: which object is the loop's loader, and what a position snapshot holds."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torpor import _user_state


class Loader:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {"index": 0, "seen": [1, 2], "generator": torch.zeros(4, dtype=torch.uint8)}

    def state_dict(self) -> dict[str, Any]:
        return self.state  # live internals, as a careless loader returns them

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Loader) and other.state["index"] == self.state["index"]

    __hash__ = object.__hash__


def test_the_loops_loader_is_found_by_identity_not_equality() -> None:
    loader, twin = Loader(), Loader()
    assert twin == loader
    assert _user_state.key_of({"ema": twin, "loader": loader}, loader) == "loader"
    assert _user_state.key_of({"ema": twin}, loader) is None
    assert _user_state.key_of({"loader": loader}, None) is None


def test_a_position_is_a_copy_that_reading_on_does_not_change() -> None:
    loader = Loader()
    before = _user_state.position(loader)
    loader.state["index"] = 1
    loader.state["seen"].append(3)
    loader.state["generator"].add_(7)
    assert before == {"index": 0, "seen": [1, 2], "generator": before["generator"]}
    assert torch.equal(before["generator"], torch.zeros(4, dtype=torch.uint8))


def test_capture_saves_a_position_taken_earlier_and_checks_it_as_any_state() -> None:
    loader = Loader()
    loader.state["index"] = 5
    assert _user_state.capture({"loader": loader}, {"loader": {"index": 4}}) == {"loader": {"index": 4}}
    assert _user_state.capture({"loader": loader})["loader"]["index"] == 5
    with pytest.raises(TypeError, match=r"state\['loader'\]\['fn'\]"):
        _user_state.capture({"loader": loader}, {"loader": {"fn": print}})
