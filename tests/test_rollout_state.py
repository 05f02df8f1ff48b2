"""Rollout bookkeeping through real TorchServe with tiny archives: the default survives a restart,
only two versions stay loaded, a lost set-default reply is read back, a mislabelled archive fails
fast, two rollouts cannot overlap, and expired tokens are renewed.

The module's server runs with 12-second tokens (``token_expiration_min=0.2``), so every step
below also crosses token expiries, which the tools must renew on their own.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from ops import client as ops_client
from ops import digests
from ops import rollout as ops_rollout
from ops import torchserve as serve
from ops.client import ServiceClient
from ops.paths import SERVER_CONFIG
from ops.rollout import Management, RolloutError, rollout_lock, start_serving
from scripts import rollout as rollout_cli
from scripts import serve as serve_cli
from tests.tiny_release import lenient_golden, synthetic_jpeg, tiny_archive, tiny_checkpoint, tiny_model_config

pytestmark = pytest.mark.slow
TOKEN_MINUTES = 0.2


def addresses() -> dict[str, str]:
    return serve.loopback_addresses() | {"token_expiration_min": str(TOKEN_MINUTES)}


class Stack:
    """A model store of tiny versions 1.0 (the configured release) to 1.3, and a run folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = folder / "store"
        config = tiny_model_config(folder)
        checkpoint = tiny_checkpoint(folder / "tiny.pt")
        tiny_archive(self.store, checkpoint, config, "1.0", "skin_lesion")
        for version in ("1.1", "1.2", "1.3"):
            tiny_archive(self.store, checkpoint, config, version)
        tiny_archive(self.store, checkpoint, config, "1.8", "skin_lesion_v1.9")  # named for 1.9, holds 1.8
        self.golden = lenient_golden(folder)
        self.run_dir = folder / "run"
        self.overrides = addresses()
        self.server: serve.Server | None = None

    def start(self) -> ops_rollout.Started:
        started = start_serving(self.run_dir, self.store, SERVER_CONFIG, self.overrides, timeout=240)
        self.server = started.server
        return started

    def rollout(self, version: str) -> str:
        return ops_rollout.rollout(self.server, version, self.golden, self.folder, timeout=180)

    def loaded(self) -> dict[str, list[str]]:
        return {d["modelVersion"]: [w["status"] for w in d["workers"]] for d in Management(self.server).versions()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("rollout-state"))
    stack.start()
    try:
        yield stack
    finally:
        if stack.server is not None:
            serve.stop(stack.server)


def test_a_lost_set_default_reply_is_read_back_not_trusted(stack, monkeypatch, capsys):
    real = Management.set_default

    def switched_then_lost(self, version):
        real(self, version)
        raise requests.ConnectionError("reply lost")

    monkeypatch.setattr(Management, "set_default", switched_then_lost)
    assert stack.rollout("1.1") == "1.0"
    assert "reply was lost" in capsys.readouterr().out
    assert Management(stack.server).default_version() == "1.1"
    assert ops_rollout.read_state(stack.server)["default"] == "1.1"

    def lost_without_switching(self, version):
        raise requests.ConnectionError("reply lost")

    monkeypatch.setattr(Management, "set_default", lost_without_switching)
    with pytest.raises(RolloutError, match=r"1\.2 aborted, 1\.1 is still the default"):
        stack.rollout("1.2")
    assert set(stack.loaded()) == {"1.0", "1.1"}  # the candidate was unloaded


def test_an_archive_built_for_another_version_fails_fast(stack):
    started = time.monotonic()
    with pytest.raises(RolloutError, match=r"skin_lesion_v1\.9\.mar holds version 1\.8, not 1\.9"):
        stack.rollout("1.9")
    assert time.monotonic() - started < 10
    with pytest.raises(RolloutError, match="no archive"):
        stack.rollout("7.7")
    assert set(stack.loaded()) == {"1.0", "1.1"}


def test_after_three_rollouts_only_two_versions_are_loaded(stack, capsys):
    assert stack.rollout("1.2") == "1.1"
    # The command line, as `make rollout` runs it: the archive comes from the server's own model store.
    argv = ["--run-dir", str(stack.run_dir), "--golden", str(stack.golden), "--golden-images", str(stack.folder)]
    assert rollout_cli.main(rollout_cli.get_args_parser().parse_args(["rollout", "--version", "1.3"] + argv)) == 0
    assert "unloaded older versions ['1.1']" in capsys.readouterr().out
    assert stack.loaded() == {"1.2": ["READY"], "1.3": ["READY"]}
    state = ops_rollout.read_state(stack.server)
    assert (state["default"], state["previous"]) == ("1.3", "1.2")
    assert state["archives"] == {"1.3": "skin_lesion_v1.3.mar", "1.2": "skin_lesion_v1.2.mar"}


def test_a_ready_server_is_ready_whatever_its_requests_logged(stack):
    # A bad request's Traceback in this instance's model log (as `make soak` or the demo meet it when
    # they attach to a running server) does not make a serving model "fail to load".
    with open(stack.run_dir / "logs" / "model_log.log", "a") as log:
        log.write("Traceback (most recent call last):\n  a bad request\n")
    started = time.monotonic()
    assert serve.wait_ready(stack.server, timeout=30)["modelVersion"] == "1.3"
    assert time.monotonic() - started < 10


def test_expired_tokens_are_renewed_once_and_retried(stack, monkeypatch):
    server = stack.server
    stale = server.token("inference")
    time.sleep(TOKEN_MINUTES * 60 + 1)
    refused = requests.get(f"{server.url('inference')}/ping", headers={"Authorization": f"Bearer {stale}"}, timeout=10)
    assert ops_client.is_token_refusal(refused)
    renewals = []
    real = ops_client.renew_token
    monkeypatch.setattr(ops_client, "renew_token", lambda *args, **kwargs: renewals.append(args[1]) or real(*args, **kwargs))
    client = ServiceClient(server)
    assert client.predict(data=synthetic_jpeg()).status_code == 200
    assert renewals == ["inference"] and server.token("inference") != stale
    assert client.predict(data=synthetic_jpeg(1)).status_code == 200 and renewals == ["inference"]
    # The old token is gone for good: renewal replaced it.
    assert requests.get(f"{server.url('inference')}/ping", headers={"Authorization": f"Bearer {stale}"},
                        timeout=10).status_code in (400, 401)


def test_the_rolled_out_default_survives_a_restart_even_after_an_old_traceback(stack, capsys):
    assert serve.stop(stack.server)
    logs = stack.run_dir / "logs"
    # What an earlier bad request or failed start left in the logs is not this start's failure.
    with open(logs / "model_log.log", "a") as log:
        log.write("Traceback (most recent call last):\n  an earlier failure\n")
    with open(logs / "console.log", "a") as log:
        log.write('Exception in thread "main" an earlier failure\n')
    # `make serve` itself: scripts/serve.py start, with the test's ports in its config.
    config = stack.folder / "config.properties"
    config.write_text(serve.render_properties(SERVER_CONFIG, stack.overrides))
    argv = ["start", "--run-dir", str(stack.run_dir), "--model-store", str(stack.store), "--config", str(config),
            "--timeout", "240"]
    assert serve_cli.main(serve_cli.get_args_parser().parse_args(argv)) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert "version 1.3 READY (the default)" in out and "warning" not in err
    stack.server = serve.Server(stack.run_dir.resolve())
    assert Management(stack.server).default_version() == "1.3"
    assert stack.loaded() == {"1.2": ["READY"], "1.3": ["READY"]}
    answer = ServiceClient(stack.server).predict(data=synthetic_jpeg())
    assert answer.status_code == 200 and answer.json()["model_version"] == "1.3"
    argv = ["--run-dir", str(stack.run_dir)]
    assert rollout_cli.main(rollout_cli.get_args_parser().parse_args(["rollback"] + argv)) == 0
    assert Management(stack.server).default_version() == "1.2"
    assert rollout_cli.main(rollout_cli.get_args_parser().parse_args(["status"] + argv)) == 0


def test_a_missing_recorded_archive_refuses_to_start_instead_of_serving_another_version(stack, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ops_rollout.STATE_FILE).write_text('{"default": "5.0", "previous": "1.0"}')
    with pytest.raises(RolloutError, match=r"rolled-out default 5\.0 cannot be restored.*no archive"):
        start_serving(run_dir, stack.store, SERVER_CONFIG, addresses())
    assert not serve.Server(run_dir).is_running()


def test_two_rollouts_cannot_run_at_once(tmp_path):
    server = serve.Server(tmp_path)
    with rollout_lock(tmp_path):
        with pytest.raises(RolloutError, match=r"another rollout or rollback is running .*pid \d+"):
            ops_rollout.rollout(server, "2.0", tmp_path / "golden.json", tmp_path, timeout=1)
        with pytest.raises(RolloutError, match="another rollout or rollback"):
            ops_rollout.rollback(server)
    with rollout_lock(tmp_path):  # released on exit
        pass


class Crash(BaseException):
    """Stands for the process dying at that point: no handler of the code under test catches it."""


def test_a_crash_at_each_step_of_a_switch_never_makes_rollback_jump_two_versions(stack, monkeypatch, capsys):
    """Crash before set-default, after it (before the state write), and during the state write; each
    is settled from what the server reports (or, after a restart, to the last confirmed default),
    and rollback then goes exactly one version back from what is served."""
    server = stack.server
    management = Management(server)
    assert (management.default_version(), ops_rollout.read_state(server)["previous"]) == ("1.2", "1.3")
    real_set_default = Management.set_default

    # 1. Dead after recording the pending switch, before asking for it: nothing switched.
    def crash_before(self, version):
        raise Crash("killed before set-default")

    monkeypatch.setattr(Management, "set_default", crash_before)
    with pytest.raises(Crash):
        stack.rollout("1.1")
    assert ops_rollout.read_state(server)["pending"]["default"] == "1.1"
    assert management.default_version() == "1.2"
    monkeypatch.setattr(Management, "set_default", real_set_default)
    assert ops_rollout.rollback(server) == "1.3"  # one step back from 1.2, as recorded
    assert "never took effect" in capsys.readouterr().out
    assert management.default_version() == "1.3" and "pending" not in ops_rollout.read_state(server)

    # 2. Dead right after the switch, before the state write: the server serves 1.1, the file said 1.3.
    def crash_after(self, version):
        real_set_default(self, version)
        raise Crash("killed after set-default")

    monkeypatch.setattr(Management, "set_default", crash_after)
    with pytest.raises(Crash):
        stack.rollout("1.1")
    monkeypatch.setattr(Management, "set_default", real_set_default)
    assert management.default_version() == "1.1"
    # Before this record existed, rollback read previous=1.2 from the stale file: 1.1 -> 1.2, skipping 1.3.
    assert ops_rollout.rollback(server) == "1.3"
    assert "had taken effect" in capsys.readouterr().out
    state = ops_rollout.read_state(server)
    assert (state["default"], state["previous"]) == ("1.3", "1.1") and management.default_version() == "1.3"

    # 3. Dead while writing the final state, then TorchServe restarted (no server left to ask):
    # the last confirmed default (1.3, previous 1.1) serves, and rollback goes to 1.1.
    monkeypatch.setattr(ops_rollout, "write_state", lambda *args, **kwargs: (_ for _ in ()).throw(Crash("killed")))
    with pytest.raises(Crash):
        stack.rollout("1.2")
    monkeypatch.undo()
    assert management.default_version() == "1.2" and ops_rollout.read_state(server)["pending"]["default"] == "1.2"
    assert serve.stop(server)
    started = stack.start()
    assert any("interrupted switch to 1.2 was never confirmed" in note for note in started.notes), started.notes
    assert Management(stack.server).default_version() == "1.3"
    state = ops_rollout.read_state(stack.server)
    assert "pending" not in state and (state["default"], state["previous"]) == ("1.3", "1.1")
    assert ops_rollout.rollback(stack.server) == "1.1"


def test_an_archive_changed_after_it_was_built_is_never_registered_or_served(stack, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stack.store, store)
    archive = store / "skin_lesion_v1.2.mar"
    with open(archive, "ab") as handle:
        handle.write(b"appended after the release")
    with pytest.raises(RolloutError, match="does not match its recorded SHA-256"):
        ops_rollout.check_archive(archive, "1.2")
    digests.digest_path(store / "skin_lesion.mar").unlink()
    run_dir = tmp_path / "run"
    with pytest.raises(RolloutError, match="no recorded SHA-256"):
        start_serving(run_dir, store, SERVER_CONFIG, addresses())
    assert not serve.Server(run_dir).is_running()
    # A rollout refuses to register it, before anything is loaded.
    loaded = set(stack.loaded())
    assert "1.2" not in loaded
    with pytest.raises(RolloutError, match="does not match its recorded SHA-256"):
        ops_rollout.rollout(stack.server, "1.2", stack.golden, stack.folder, timeout=60, model_store=store)
    assert set(stack.loaded()) == loaded
