"""OperatorSettings: defaults, TORPOR_* parsing, and messages that name the variable and the value."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap

import pytest

from torpor_operator.settings import DEFAULT_TERMINATION_TAINTS, OperatorSettings, SettingsError, start_up_priority


def test_defaults() -> None:
    s = OperatorSettings.from_env({})
    assert s == OperatorSettings()
    assert s.namespaces == ()
    assert s.termination_taints == DEFAULT_TERMINATION_TAINTS
    assert "ToBeDeletedByClusterAutoscaler" in s.termination_taints
    assert s.master_port == 29500
    assert s.peering == ""
    assert s.peering_priority is None  # drawn at start-up
    assert s.peering_lifetime_seconds == 60
    assert s.lost_node_force_delete_seconds == 30
    assert s.reconcile_concurrency == 32


def test_every_field_has_a_variable_and_a_docstring() -> None:
    tree = ast.parse(textwrap.dedent(inspect.getsource(OperatorSettings)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    documented = {
        node.target.id
        for node, after in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
    }
    for f in dataclasses.fields(OperatorSettings):
        assert f.metadata["env"] == "TORPOR_" + f.name.upper(), f.name
        assert f.name in documented, f"{f.name} has no docstring"


def test_from_env_parses_every_kind() -> None:
    s = OperatorSettings.from_env({
        "TORPOR_NAMESPACES": "team-a, team-b",
        "TORPOR_TERMINATION_TAINTS": "example.com/going,other",
        "TORPOR_MASTER_PORT": "23456",
        "TORPOR_BACKOFF_BASE_SECONDS": "0.5",
        "TORPOR_BACKOFF_MAX_SECONDS": "8",
        "TORPOR_RETENTION_INTERVAL_SECONDS": "5",
        "TORPOR_PEERING": "torpor",
        "TORPOR_HEALTH_PORT": "0",
        "TORPOR_METRICS_PORT": "9999",
        "TORPOR_LOG_FORMAT": "plain",
        "TORPOR_WATCH_TIMEOUT_SECONDS": "10",
        "TORPOR_PEERING_PRIORITY": "-7",
        "TORPOR_PEERING_LIFETIME_SECONDS": "6",
        "TORPOR_LOST_NODE_FORCE_DELETE_SECONDS": "2.5",
        "UNRELATED": "x",
    })
    assert s.namespaces == ("team-a", "team-b")
    assert s.termination_taints == ("example.com/going", "other")
    assert (s.master_port, s.health_port, s.metrics_port) == (23456, 0, 9999)
    assert (s.backoff_base_seconds, s.backoff_max_seconds) == (0.5, 8.0)
    assert (s.peering, s.log_format, s.watch_timeout_seconds) == ("torpor", "plain", 10.0)
    assert (s.peering_priority, s.peering_lifetime_seconds) == (-7, 6)
    assert s.lost_node_force_delete_seconds == 2.5


def test_backoff_doubles_up_to_the_cap() -> None:
    s = OperatorSettings(backoff_base_seconds=2, backoff_max_seconds=10)
    assert [s.backoff_seconds(n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TORPOR_MASTER_PORT": "http"}, "TORPOR_MASTER_PORT must be an integer, got 'http'"),
        ({"TORPOR_MASTER_PORT": "0"}, "TORPOR_MASTER_PORT: master_port must be a port number in 1..65535, got 0"),
        ({"TORPOR_HEALTH_PORT": "70000"},
         "TORPOR_HEALTH_PORT: health_port must be a port number in 0..65535, got 70000"),
        ({"TORPOR_BACKOFF_BASE_SECONDS": "soon"}, "TORPOR_BACKOFF_BASE_SECONDS must be a number, got 'soon'"),
        ({"TORPOR_BACKOFF_BASE_SECONDS": "-1"},
         "TORPOR_BACKOFF_BASE_SECONDS: backoff_base_seconds must be a finite number of seconds > 0, got -1.0"),
        ({"TORPOR_RETENTION_INTERVAL_SECONDS": "inf"}, "retention_interval_seconds must be a finite number"),
        ({"TORPOR_BACKOFF_MAX_SECONDS": "1"}, "TORPOR_BACKOFF_MAX_SECONDS: backoff_max_seconds (1.0) must be >= "
                                              "backoff_base_seconds (10.0)"),
        ({"TORPOR_LOG_FORMAT": "xml"}, "TORPOR_LOG_FORMAT: log_format must be 'json' or 'plain', got 'xml'"),
        ({"TORPOR_NAMESPACES": "ok,Not_OK"}, "TORPOR_NAMESPACES: namespaces: 'Not_OK' is not a valid namespace name"),
        ({"TORPOR_WATCH_TIMEOUT_SECONDS": "1.5"}, "TORPOR_WATCH_TIMEOUT_SECONDS must be an integer, got '1.5'"),
        ({"TORPOR_WATCH_TIMEOUT_SECONDS": "0"},
         "TORPOR_WATCH_TIMEOUT_SECONDS: watch_timeout_seconds must be a whole number of seconds >= 1, got 0"),
        ({"TORPOR_PEERING": "Bad Name"}, "TORPOR_PEERING: peering: 'Bad Name' is not a valid object name"),
        ({"TORPOR_PEERING_PRIORITY": "high"}, "TORPOR_PEERING_PRIORITY must be an integer, got 'high'"),
        ({"TORPOR_PEERING_PRIORITY": str(2**53)},
         f"TORPOR_PEERING_PRIORITY: peering_priority must be an integer within +-{2**53 - 1}, got {2**53}"),
        ({"TORPOR_PEERING_LIFETIME_SECONDS": "4"}, "TORPOR_PEERING_LIFETIME_SECONDS: peering_lifetime_seconds must "
                                                   "be a whole number of seconds in 5..3600, got 4"),
        ({"TORPOR_PEERING_LIFETIME_SECONDS": "3601"}, "peering_lifetime_seconds must be a whole number of seconds in "
                                                      "5..3600, got 3601"),
        ({"TORPOR_LOST_NODE_FORCE_DELETE_SECONDS": "-1"}, "TORPOR_LOST_NODE_FORCE_DELETE_SECONDS: "
         "lost_node_force_delete_seconds must be a finite number of seconds >= 0, got -1.0"),
        ({"TORPOR_PEERING_LIFETIME_SECONDS": "7.5"}, "TORPOR_PEERING_LIFETIME_SECONDS must be an integer, got '7.5'"),
        ({"TORPOR_RECONCILE_CONCURRENCY": "0"},
         "TORPOR_RECONCILE_CONCURRENCY: reconcile_concurrency must be a whole number >= 1, got 0"),
    ],
)
def test_errors_name_the_variable_and_the_value(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env(env)
    assert expected in str(info.value)


def test_direct_construction_names_the_field() -> None:
    with pytest.raises(SettingsError, match=r"termination_taints: 'a b' is not a taint key"):
        OperatorSettings(termination_taints=("a b",))
    with pytest.raises(SettingsError, match=r"master_port must be a port number in 1\.\.65535, got True"):
        OperatorSettings(master_port=True)


def test_peering_bounds_are_inclusive() -> None:
    assert OperatorSettings(peering_lifetime_seconds=5).peering_lifetime_seconds == 5
    assert OperatorSettings(peering_lifetime_seconds=3600).peering_lifetime_seconds == 3600
    for priority in (0, 2**53 - 1, -(2**53 - 1)):
        assert OperatorSettings(peering_priority=priority).peering_priority == priority
    with pytest.raises(SettingsError, match=r"peering_priority must be an integer within \+-\d+, got True"):
        OperatorSettings(peering_priority=True)


def test_start_up_priority_prefers_the_earlier_start_and_never_ties_within_a_millisecond() -> None:
    started = 1_700_000_000_123_000_000  # ns, the start of a millisecond
    assert start_up_priority(started, 0) > start_up_priority(started + 1_000_000, 999)  # 1 ms later loses
    same_ms = {start_up_priority(started + offset, tiebreak) for offset in (0, 999_999) for tiebreak in range(1000)}
    assert len(same_ms) == 1000  # within a millisecond, only the tiebreak decides
    now = start_up_priority(1_760_000_000 * 10**9, 999)
    assert -(2**53 - 1) < now < 0  # JSON-safe and below any explicit priority >= 0
    assert OperatorSettings(peering_priority=now).peering_priority == now
    with pytest.raises(ValueError, match=r"tiebreak in 0\.\.999, got 1, 1000"):
        start_up_priority(1, 1000)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        OperatorSettings().master_port = 1  # type: ignore[misc]
