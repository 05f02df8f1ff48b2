"""Rollout and rollback of the released model through the management API under continuous load, with zero failed
client requests (bookkeeping, restarts and tokens with tiny archives: tests/test_rollout_state.py)."""

import threading
import time

import pytest
import requests
import torch
import yaml

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import Meta, make_checkpoint, read_checkpoint
from ops import torchserve as serve
from ops.archive import ArchiveSpec, build_archive
from ops.paths import MODEL_CONFIG
from ops.rollout import archive_name, status
from scripts import rollout
from tests.conftest import DATA, RELEASED_CHECKPOINT, ROOT, ready_server

pytestmark = [pytest.mark.slow, pytest.mark.data]


def release(store, version, checkpoint=RELEASED_CHECKPOINT):
    # These archives test rollouts, not the release policy: no input gate is required of them.
    build_archive(ArchiveSpec(checkpoint, MODEL_CONFIG, store, version, archive_name(version) if version else None,
                              require_gate=False))


def run(action, server, version=None):
    argv = [action, "--run-dir", str(server.run_dir), "--golden-images", str(DATA), "--timeout", "300"]
    return rollout.main(rollout.get_args_parser().parse_args(argv + (["--version", version] if version else [])))


@pytest.fixture()
def versioned_server(tmp_path, samples_dir):
    store = tmp_path / "store"
    release(store, None)  # skin_lesion.mar, the released version, served at start
    release(store, "1.1")
    preprocess = default_preprocess_config("efficientnet_lite0")
    # Checkpoints that must be refused at rollout, each with the served operating point so that they pack.
    point = read_checkpoint(RELEASED_CHECKPOINT).meta.operating_point
    wrong_shape = make_checkpoint(build_model("efficientnet_lite0", num_classes=5), "efficientnet_lite0", preprocess,
                                  Meta(preprocess, operating_point=point))
    wrong_shape.config["num_classes"] = 7
    release(store, "9.0", wrong_shape.save(tmp_path / "wrong_shape.pt"))
    torch.manual_seed(0)
    uniform = {"none": Calibration.from_dict({"temperature": 1.0, "class_bias": None, "class_prior": [1 / 7] * 7})}
    untrained = make_checkpoint(build_model("efficientnet_lite0"), "efficientnet_lite0", preprocess,
                                Meta(preprocess, calibration=uniform, operating_point=point))
    release(store, "9.1", untrained.save(tmp_path / "untrained.pt"))
    server = ready_server(tmp_path / "run", store)
    try:
        yield server
    finally:
        serve.stop(server)


def test_rollout_and_rollback_under_load_lose_no_request(versioned_server, samples_dir, capsys, released_version):
    server = versioned_server
    image = (samples_dir / "ISIC_0025248.jpg").read_bytes()
    results, stop = [], threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(f"{server.url('inference')}/predictions/skin_lesion", data=image,
                                        headers=server.headers("inference"), timeout=60)
                results.append((response.status_code, response.json().get("model_version")))
            except (requests.RequestException, ValueError) as error:
                results.append((-1, repr(error)))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(2)
        assert run("rollout", server, "1.1") == 0
        time.sleep(2)
        current = status(server)
        workers = ["READY"] * yaml.safe_load(MODEL_CONFIG.read_text())["minWorkers"]
        assert current["default"] == "1.1" and current["versions"] == {released_version: workers, "1.1": workers}
        assert results[-1][1] == "1.1"
        assert run("rollback", server) == 0
        time.sleep(2)
        assert status(server)["default"] == released_version and results[-1][1] == released_version

        assert run("rollout", server, "9.0") == 1  # wrong-shaped checkpoint: fails to load
        err = capsys.readouterr().err
        assert f"9.0 aborted, {released_version} is still the default" in err and "size mismatch" in err
        assert run("rollout", server, "9.1") == 1  # loads, but fails the golden smoke test
        assert "smoke test failed" in capsys.readouterr().err
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=90)
    final = status(server)
    assert final["default"] == released_version and set(final["versions"]) == {released_version, "1.1"}
    failed = [r for r in results if r[0] != 200]
    print(f"\nrollout under load: {len(results)} requests, {len(failed)} failed, versions served "
          f"{sorted({r[1] for r in results if r[0] == 200})}")
    assert not failed
    assert {r[1] for r in results} == {released_version, "1.1"}


def test_release_writes_a_versioned_archive(tmp_path):
    import json
    import zipfile

    args = rollout.get_args_parser().parse_args(["release", "--version", "2.3", "--model-store", str(tmp_path)])
    assert rollout.main(args) == 0
    manifest = json.loads(zipfile.ZipFile(tmp_path / "skin_lesion_v2.3.mar").read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelVersion"] == "2.3" and manifest["model"]["modelName"] == "skin_lesion"
    assert (ROOT / "models" / "golden_smoke.json").exists()


def test_a_release_is_never_replaced_silently_and_its_digest_is_recorded(tmp_path, capsys, monkeypatch):
    import hashlib
    import json

    from ops import digests
    from ops.rollout import RolloutError, check_archive

    archive = tmp_path / "skin_lesion_v2.5.mar"
    argv = ["release", "--version", "2.5", "--model-store", str(tmp_path)]
    assert rollout.main(rollout.get_args_parser().parse_args(argv)) == 0
    first = archive.read_bytes()
    # Recorded in sha256sum's format, and checked before anything registers or serves it.
    assert (tmp_path / "skin_lesion_v2.5.mar.sha256").read_text() == f"{hashlib.sha256(first).hexdigest()}  {archive.name}\n"
    check_archive(archive, "2.5")
    # The same version again: refused, the archive untouched.
    capsys.readouterr()
    assert rollout.main(rollout.get_args_parser().parse_args(argv)) == 1
    assert "--force" in capsys.readouterr().err and archive.read_bytes() == first
    # A forced replacement that dies between writing the archive and recording its digest: the
    # archive no longer matches the digest, so nothing serves it until it is rebuilt. The
    # replacement packs a config that differs by a comment, so that its bytes differ even when
    # both builds fall in the same second (the archive's timestamps are its only other change).
    from ops.paths import MODEL_CONFIG

    changed_config = tmp_path / "changed" / "model-config.yaml"
    changed_config.parent.mkdir()
    changed_config.write_text(MODEL_CONFIG.read_text() + "\n# the replacement\n")
    real_record = digests.record
    monkeypatch.setattr(digests, "record", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        rollout.main(rollout.get_args_parser().parse_args(argv + ["--force", "--model-config", str(changed_config)]))
    assert archive.read_bytes() != first
    monkeypatch.setattr(digests, "record", real_record)
    with pytest.raises(RolloutError, match="does not match its recorded SHA-256"):
        check_archive(archive, "2.5")
    assert not list(tmp_path.glob(".*partial"))
    # Forced again, to the end: served again, and the ledger says what was replaced and that it was forced.
    assert rollout.main(rollout.get_args_parser().parse_args(argv + ["--force"])) == 0
    check_archive(archive, "2.5")
    ledger = [json.loads(line) for line in (tmp_path / "releases.jsonl").read_text().splitlines()]
    assert [entry.get("forced", False) for entry in ledger] == [False, True]
    assert ledger[1]["replaced_sha256"] == ledger[0]["sha256"] and ledger[1]["version"] == "2.5"


def test_release_refuses_a_checkpoint_without_an_input_gate(tmp_path, capsys):
    from tests.tiny_release import tiny_checkpoint, tiny_model_config

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    args = rollout.get_args_parser().parse_args(["release", "--version", "2.4", "--checkpoint", str(checkpoint),
                                                 "--model-config", str(tiny_model_config(tmp_path)),
                                                 "--model-store", str(tmp_path / "store")])
    assert rollout.main(args) == 1
    assert "out-of-distribution gate" in capsys.readouterr().err
    assert not (tmp_path / "store" / "skin_lesion_v2.4.mar").exists()
