"""Every seed error and every validation message of the runtime's public constructors.

Each message must name the field and the value it got, so a user can fix the call from the
error alone.
"""

from __future__ import annotations

import signal

import pytest

import torpor
from torpor import CheckpointConfig
from torpor.env import RuntimeEnv, parse_signal
from torpor.retention import RetentionPolicy
from torpor.storage import S3Settings, open_storage


# -- OnRequestExit: the seed's ValueErrors ------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"save_ckpt": 1}, ["save_ckpt", "1"]),
        ({"save_ckpt": "yes"}, ["save_ckpt", "'yes'"]),
        ({"save_export": None}, ["save_export", "None"]),
        ({"file_name": 3}, ["file_name", "3"]),
        ({"file_name": "a/b"}, ["file_name", "'a/b'", "'/'"]),
        ({"file_name": ""}, ["file_name", "''"]),
        ({"directory": 5}, ["directory", "5"]),
        ({"sig": "SIGTERM"}, ["sig", "'SIGTERM'"]),
        ({"sig": 15.0}, ["sig", "15.0"]),
        ({"sig": True}, ["sig", "True"]),
        ({"sig": signal.SIGKILL}, ["SIGKILL", "cannot be caught"]),
        ({"sig": signal.SIGSTOP}, ["SIGSTOP", "cannot be caught"]),
        ({"sig": 9999}, ["sig=9999", "not a signal"]),
        ({"config_file": 7}, ["config_file", "7"]),
        ({"check_every_n_steps": 0}, ["check_every_n_steps", "0"]),
        ({"file_poll_seconds": 0}, ["file_poll_seconds", "0"]),
        ({"exit_process": "no"}, ["exit_process", "'no'"]),
        ({"integrated_save": 0}, ["integrated_save", "0"]),
    ],
)
def test_on_request_exit_rejects(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        torpor.OnRequestExit(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_on_request_exit_accepts_the_seed_defaults_and_signal_enums(tmp_path) -> None:
    cb = torpor.OnRequestExit()
    assert (cb.save_ckpt, cb.save_export, cb.file_name, cb.directory, cb.sig, cb.config_file) == (
        True, True, "Net", "./checkpoints", signal.SIGTERM, None)  # the run's checkpoint root, not the seed's "./"
    assert torpor.OnRequestExit(sig=signal.SIGUSR1, directory=tmp_path).sig == signal.SIGUSR1


# -- CheckpointMonitor / CheckpointConfig ------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        ({"prefix": 1}, ValueError, ["prefix", "1"]),
        ({"prefix": "a/b"}, ValueError, ["prefix", "'a/b'"]),
        ({"prefix": ""}, ValueError, ["prefix", "''"]),
        ({"directory": 3}, ValueError, ["directory", "3"]),
        ({"config": {"save_checkpoint_steps": 2}}, TypeError, ["config", "CheckpointConfig", "dict"]),
        ({"save_checkpoint_steps": -1}, ValueError, ["save_checkpoint_steps", "-1"]),
        ({"save_checkpoint_steps": 2.5}, TypeError, ["save_checkpoint_steps", "2.5"]),
        ({"save_checkpoint_steps": True}, TypeError, ["save_checkpoint_steps", "True"]),
        ({"save_checkpoint_seconds": -3}, ValueError, ["save_checkpoint_seconds", "-3"]),
        ({"save_checkpoint_seconds": "10"}, TypeError, ["save_checkpoint_seconds", "'10'"]),
        ({"keep_checkpoint_max": -1}, ValueError, ["keep_checkpoint_max", "-1"]),
        ({"keep_checkpoint_per_n_minutes": -2}, ValueError, ["keep_checkpoint_per_n_minutes", "-2"]),
        ({"save_checkpoint_steps": 10, "save_checkpoint_seconds": 60}, ValueError,
         ["save_checkpoint_steps=10", "save_checkpoint_seconds=60", "together"]),
        ({"keep_checkpoint_max": 3, "keep_checkpoint_per_n_minutes": 10}, ValueError,
         ["keep_checkpoint_max=3", "keep_checkpoint_per_n_minutes=10", "together"]),
        ({"integrated_save": "yes"}, TypeError, ["integrated_save", "'yes'"]),
        ({"save_network_params": 1}, TypeError, ["save_network_params", "1"]),
        ({"save_trainable_params": None}, TypeError, ["save_trainable_params", "None"]),
        ({"saved_network": "net"}, TypeError, ["saved_network", "'net'"]),
        ({"append_info": "epoch_num"}, TypeError, ["append_info", "'epoch_num'"]),
        ({"append_info": ["epoch"]}, ValueError, ["append_info", "'epoch'"]),
        ({"append_info": [{1: 2}]}, TypeError, ["append_info", "1"]),
        ({"append_info": [{"lr": [0.1]}]}, TypeError, ["append_info['lr']", "[0.1]"]),
        ({"append_info": [3]}, TypeError, ["append_info", "3"]),
        ({"enc_key": "secret"}, TypeError, ["enc_key", "str"]),
        ({"enc_mode": "AES-ECB"}, ValueError, ["enc_mode", "'AES-ECB'"]),
        ({"global_batch_size": -8}, ValueError, ["global_batch_size", "-8"]),
        ({"async_save": "yes"}, TypeError, ["async_save", "'yes'"]),
        ({"exception_save": 1}, TypeError, ["exception_save", "1"]),
        ({"enc_key": b"0" * 20}, ValueError, ["enc_key of 20 bytes", "'AES-GCM'", "16, 24 or 32"]),
        ({"enc_key": b"0" * 32, "enc_mode": "SM4-CBC"}, ValueError, ["enc_key of 32 bytes", "'SM4-CBC'", "16"]),
        ({"async_errors": "ignore"}, ValueError, ["async_errors", "'ignore'"]),
    ],
)
def test_checkpoint_monitor_rejects(kwargs: dict, exc: type[Exception], fragments: list[str]) -> None:
    with pytest.raises(exc) as info:
        torpor.CheckpointMonitor(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_checkpoint_config_rejects_the_same_as_the_monitor() -> None:
    with pytest.raises(ValueError, match=r"save_checkpoint_steps=10 and save_checkpoint_seconds=60"):
        CheckpointConfig(save_checkpoint_steps=10, save_checkpoint_seconds=60)


def test_documented_precedence_of_the_exclusive_pairs() -> None:
    by_time = CheckpointConfig(save_checkpoint_seconds=30)  # steps left at its default 1
    assert by_time.by_seconds
    windows = CheckpointConfig(keep_checkpoint_per_n_minutes=10)  # keep_max left at its default 5
    assert windows.retention == RetentionPolicy(keep_max=0, keep_per_n_minutes=10)
    assert CheckpointConfig(keep_checkpoint_max=0).retention == RetentionPolicy(keep_max=0)
    assert not CheckpointConfig().by_seconds


def test_monitor_takes_every_setting_from_config() -> None:
    cfg = CheckpointConfig(save_checkpoint_steps=7, keep_checkpoint_max=2, append_info=["epoch_num", {"a": 1}])
    mon = torpor.CheckpointMonitor(config=cfg, save_checkpoint_steps=3)
    assert mon.config is cfg


# -- smaller surfaces ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        ({"keep_max": -1}, ValueError, ["keep_max", "-1"]),
        ({"keep_max": 1.5}, TypeError, ["keep_max", "1.5"]),
        ({"keep_per_n_minutes": -1}, ValueError, ["keep_per_n_minutes", "-1"]),
        ({"keep_per_n_minutes": float("inf")}, ValueError, ["keep_per_n_minutes", "inf"]),
        ({"keep_per_n_minutes": "5"}, TypeError, ["keep_per_n_minutes", "'5'"]),
    ],
)
def test_retention_policy_rejects(kwargs: dict, exc: type[Exception], fragments: list[str]) -> None:
    with pytest.raises(exc) as info:
        RetentionPolicy(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"max_concurrency": 0}, ["max_concurrency", "0"]),
        ({"multipart_chunksize": 1024 * 1024}, ["multipart_chunksize", "1048576", "5 MiB"]),
        ({"max_attempts": True}, ["max_attempts", "True"]),
    ],
)
def test_s3_settings_reject(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        S3Settings(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [("s3://", "names no bucket"), ("gs://bucket/x", "unsupported scheme"), ("", "non-empty")],
)
def test_open_storage_rejects(uri: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        open_storage(uri)
    assert repr(uri) in str(info.value)


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"TORPOR_SAVE_STEPS": "ten"}, ["TORPOR_SAVE_STEPS", "'ten'"]),
        ({"TORPOR_SAVE_SECONDS": "-1"}, ["TORPOR_SAVE_SECONDS", "'-1'"]),
        ({"TORPOR_KEEP_MAX": "1.5"}, ["TORPOR_KEEP_MAX", "'1.5'"]),
        ({"TORPOR_KEEP_PER_N_MINUTES": "nan"}, ["TORPOR_KEEP_PER_N_MINUTES", "'nan'"]),
        ({"TORPOR_EXIT_CHECK_STEPS": "0"}, ["TORPOR_EXIT_CHECK_STEPS", "'0'"]),
        ({"TORPOR_EXIT_SIGNAL": "SIGNOPE"}, ["TORPOR_EXIT_SIGNAL", "'SIGNOPE'"]),
    ],
)
def test_env_rejects_malformed_variables(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        RuntimeEnv.from_environ(env)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_env_defaults_and_values() -> None:
    assert RuntimeEnv.from_environ({}) == RuntimeEnv()
    assert not RuntimeEnv.from_environ({}).under_operator
    env = RuntimeEnv.from_environ({
        "TORPOR_CHECKPOINT_URI": "s3://b/p", "TORPOR_EXIT_FILE": "/etc/torpor/exit.json",
        "TORPOR_EXIT_SIGNAL": "USR1", "TORPOR_RESUME_FROM": "CKP-2_7", "TORPOR_SAVE_SECONDS": "60",
        "TORPOR_KEEP_PER_N_MINUTES": "30", "TORPOR_JOB": "ns/job", "TORPOR_INCARNATION": "3",
    })
    assert env.checkpoint_uri == "s3://b/p" and env.exit_signal == signal.SIGUSR1
    assert env.resume_from == "CKP-2_7" and env.save_seconds == 60 and env.keep_per_n_minutes == 30
    assert env.under_operator and env.incarnation == "3"
    assert RuntimeEnv.from_environ({"TORPOR_RESUME_FROM": "latest"}).resume_from is None
    assert parse_signal("15") == parse_signal("SIGTERM") == parse_signal("term") == signal.SIGTERM


def test_from_env_constructors_follow_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_CHECKPOINT_URI", "s3://bucket/jobs/a")
    monkeypatch.setenv("TORPOR_SAVE_SECONDS", "120")
    monkeypatch.setenv("TORPOR_KEEP_PER_N_MINUTES", "15")
    monkeypatch.setenv("TORPOR_EXIT_FILE", "/x/exit.json")
    monkeypatch.setenv("TORPOR_EXIT_CHECK_STEPS", "4")
    exit_cb, monitor = torpor.callbacks_from_env()
    assert isinstance(exit_cb, torpor.OnRequestExit) and isinstance(monitor, torpor.CheckpointMonitor)
    assert exit_cb.directory == monitor.directory == "s3://bucket/jobs/a"
    assert exit_cb.config_file == "/x/exit.json" and exit_cb.check_every_n_steps == 4
    assert monitor.config.by_seconds and monitor.config.save_checkpoint_seconds == 120
    assert monitor.config.retention == RetentionPolicy(keep_max=0, keep_per_n_minutes=15)


def test_from_env_with_save_steps_and_seconds_both_zero_means_no_periodic_saves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the operator exports for a TrainingJob with neither saveSteps nor saveSeconds."""
    monkeypatch.setenv("TORPOR_SAVE_STEPS", "0")
    monkeypatch.setenv("TORPOR_SAVE_SECONDS", "0")
    exit_cb, monitor = torpor.callbacks_from_env()
    assert exit_cb.save_ckpt and not monitor.config.periodic and not monitor.config.by_seconds
    assert not CheckpointConfig(save_checkpoint_steps=0, save_checkpoint_seconds=0).periodic
    assert CheckpointConfig().periodic and CheckpointConfig(save_checkpoint_seconds=5).periodic


def test_callbacks_from_env_gives_each_option_to_every_callback_that_takes_it(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_CHECKPOINT_URI", "s3://bucket/from-env")
    key = bytes(range(16))
    exit_cb, monitor = torpor.callbacks_from_env(directory=str(tmp_path), integrated_save=False, enc_key=key,
                                                 enc_mode="SM4-CBC", save_export=False, prefix="P")
    assert exit_cb.directory == monitor.directory == str(tmp_path)
    assert exit_cb.integrated_save is False and monitor.config.integrated_save is False
    assert exit_cb.encryption == monitor.encryption and monitor.encryption.mode == "SM4-CBC"
    assert exit_cb.save_export is False and monitor.prefix == "P"
    with pytest.raises(TypeError, match=r"callbacks_from_env.*'save_every'"):
        torpor.callbacks_from_env(save_every=3)


def _net():
    import torch

    return torch.nn.Linear(1, 1)


def test_a_run_refuses_two_different_keys_naming_both_callbacks() -> None:
    with pytest.raises(ValueError) as info:
        torpor.Loop(_net(), callbacks=[torpor.OnRequestExit(enc_key=b"a" * 16),
                                       torpor.CheckpointMonitor(enc_key=b"b" * 16)])
    for fragment in ("enc_key", "OnRequestExit", "CheckpointMonitor(prefix='CKP')"):
        assert fragment in str(info.value)
    assert "aaaa" not in str(info.value) and "bbbb" not in str(info.value)
    with pytest.raises(ValueError, match=r"enc_mode='AES-GCM'.*enc_mode='AES-CBC'"):
        torpor.Loop(_net(), callbacks=[torpor.OnRequestExit(enc_key=b"a" * 16),
                                       torpor.CheckpointMonitor(enc_key=b"a" * 16, enc_mode="AES-CBC")])


def test_a_run_refuses_two_directories_and_two_layouts_naming_both(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"directory.*OnRequestExit.*'/a'.*CheckpointMonitor\(prefix='CKP'\).*'/b'"):
        torpor.Loop(_net(), callbacks=[torpor.OnRequestExit(directory="/a"), torpor.CheckpointMonitor(directory="/b")])
    with pytest.raises(ValueError, match=r"integrated_save.*OnRequestExit.*False.*CheckpointMonitor.*True"):
        torpor.Loop(_net(), callbacks=[torpor.OnRequestExit(integrated_save=False), torpor.CheckpointMonitor()])


def test_a_run_shares_what_one_callback_was_given(tmp_path) -> None:
    exit_cb = torpor.OnRequestExit()
    monitor = torpor.CheckpointMonitor(directory=str(tmp_path), enc_key=b"k" * 16, integrated_save=False)
    loop = torpor.Loop(_net(), callbacks=[exit_cb, monitor])
    assert exit_cb.directory == monitor.directory == loop.shared.directory == str(tmp_path)
    assert exit_cb.encryption == monitor.encryption and exit_cb.integrated_save is False
    same = torpor.Loop(_net(), callbacks=[torpor.OnRequestExit(directory=str(tmp_path) + "/"),
                                          torpor.CheckpointMonitor(directory=str(tmp_path))])
    assert same.shared.directory.rstrip("/") == str(tmp_path)  # one place, however it is spelt


def test_model_rejects() -> None:
    import torch

    with pytest.raises(TypeError, match=r"network must be a torch.nn.Module, got 'net'"):
        torpor.Model("net")
    with pytest.raises(ValueError, match=r"scheduler_interval must be 'step' or 'epoch', got 'batch'"):
        torpor.Model(torch.nn.Linear(1, 1), scheduler_interval="batch")
    model = torpor.Model(torch.nn.Linear(1, 1), loss_fn=torch.nn.MSELoss())
    with pytest.raises(TypeError, match="optimizer=None"):
        model.train(1, [])
    with pytest.raises(ValueError, match=r"epoch must be a positive int, got 0"):
        torpor.Model(torch.nn.Linear(1, 1), optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters())).train(0, [])
    with pytest.raises(TypeError, match=r"callbacks must be torpor.Callback instances, got 3"):
        torpor.Loop(torch.nn.Linear(1, 1), callbacks=[3])
