"""Security properties of the repository and of a running server."""

import hashlib
import re
import subprocess
import zipfile

import pytest
import requests

from ops.paths import MODEL_CONFIG, SERVER_CONFIG
from ops.torchserve import read_properties
from tests.conftest import ROOT


def tracked_python_files():
    """The repository's Python files: tracked ones and new ones not yet committed (not ignored), as they are on disk."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in sorted(set(names)) if (ROOT / name).is_file()]


def test_every_torch_load_is_weights_only():
    calls = []
    for path in tracked_python_files():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[match.start():end + 1]))
    assert calls, "the scan found no torch.load at all"
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert not unsafe


def test_the_security_document_says_what_the_server_config_enables():
    properties = read_properties(SERVER_CONFIG)
    security = (ROOT / "SECURITY.md").read_text()
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    if properties.get("enable_model_api") == "true":
        assert "enable_model_api=true" in security
        assert "stays disabled" not in security and "model API off" not in security
        # Where it is enabled: the loopback management listener, exactly as configured.
        assert f"management_address={properties['management_address']}" in security
        assert properties["management_address"].startswith("http://127.0.0.1:")
    minutes = properties["token_expiration_min"]
    assert f"`token_expiration_min` ({minutes} min" in security and f"`token_expiration_min`\n({minutes} minutes" in operations
    assert "POST /token?type=" in (ROOT / "ops" / "client.py").read_text() and "/token?type=inference" in operations


def test_dependencies_are_pinned():
    for requirements in ROOT.glob("requirements*.txt"):
        for line in requirements.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", line), f"{requirements.name}: {line}"


def test_archive_holds_only_repository_files(release_store):
    archive = zipfile.ZipFile(release_store / "skin_lesion.mar")
    expected = {f"handler/{p.name}": p for p in (ROOT / "handler").glob("*.py")}
    expected |= {"skin_lesion_handler.py": ROOT / "handler" / "skin_lesion_handler.py",
                 "skin_lesion.pt": ROOT / "models" / "skin_lesion.pt",
                 "model-config.yaml": MODEL_CONFIG}
    names = set(archive.namelist()) - {"MAR-INF/MANIFEST.json"}
    assert names == set(expected)
    for name, source in expected.items():
        assert hashlib.sha256(archive.read(name)).digest() == hashlib.sha256(source.read_bytes()).digest(), name


@pytest.mark.slow
@pytest.mark.data
def test_management_api_refuses_registration_and_everything_needs_a_token(torchserve):
    properties = torchserve.properties
    assert properties["allowed_urls"].startswith("file://") and "http" not in properties["allowed_urls"]
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    management = torchserve.url("management")
    for url in ("https://example.com/evil.mar", "file:///etc/passwd"):
        response = requests.post(f"{management}/models", params={"url": url}, headers=torchserve.headers("management"), timeout=30)
        assert 400 <= response.status_code < 500, response.text
    assert requests.get(f"{management}/models", timeout=10).status_code in (400, 401)
    assert requests.get(f"{torchserve.url('inference')}/ping", timeout=10).status_code in (400, 401)
    assert "skin_lesion" in requests.get(f"{management}/models", headers=torchserve.headers("management"), timeout=10).text


def test_the_security_document_says_where_authorization_is_off_and_nowhere_else():
    """Token authorization is off in exactly one configuration (the KServe / Kubernetes pod, fenced
    by the mesh and NetworkPolicies); the documents say so instead of "no configuration turns it off"."""
    from ops.cluster import Replica

    configs = [SERVER_CONFIG, ROOT / "deploy" / "kserve" / "config.properties"]
    off = [path for path in configs if read_properties(path).get("disable_token_authorization") == "true"]
    assert off == [ROOT / "deploy" / "kserve" / "config.properties"]
    replica = Replica("r0", ROOT / "run" / "x", 1, 2, 3, 4, 5)
    assert "disable_token_authorization" not in replica.overrides()  # the cluster's replicas keep it on
    security = (ROOT / "SECURITY.md").read_text()
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for text in (security, operations):
        assert "no configuration that turns authorization off" not in text.lower()
        assert "no configuration turns it off" not in text.lower()
        assert "tls proxy or `--share`" not in text.lower()  # --share relays images through a third party
    assert "deploy/kserve/config.properties" in security and "authorizationpolicy.yaml" in security
    assert "--allow-third-party-relay" in security and "--ncs" in security
