"""Token handling without a server: what counts as a token refusal, and renewal by another client.

Renewal through real TorchServe (expired tokens, one renewal, one retry) is in
tests/test_rollout_state.py.
"""

from __future__ import annotations

import json

import requests

from ops.client import ServiceClient, is_token_refusal, renew_token
from ops.torchserve import Server, free_port


def answer(status: int, text: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = text.encode()
    return response


def fake_run_dir(folder, inference="new-token"):
    port = free_port()  # nothing listens there: any HTTP call would fail
    (folder / "config.properties").write_text(f"inference_address=http://127.0.0.1:{port}\n"
                                              f"management_address=http://127.0.0.1:{port}\n")
    keys = {"management": {"key": "m"}, "inference": {"key": inference}, "API": {"key": "api"}}
    (folder / "key_file.json").write_text(json.dumps(keys))
    return Server(folder)


def test_token_refusals_are_recognised_and_nothing_else():
    message = ('{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. '
               'Token either incorrect, expired, or not provided correctly"}')
    assert is_token_refusal(answer(400, message)) and is_token_refusal(answer(401, message))
    assert not is_token_refusal(answer(400, '{"error": {"code": "invalid_image"}}'))
    assert not is_token_refusal(answer(500, message))


def test_a_token_someone_else_renewed_is_used_without_renewing_again(tmp_path):
    server = fake_run_dir(tmp_path)
    assert renew_token(server, "inference", stale="old-token") == "new-token"
    # The file's token is the refused one and the token API cannot be reached: no token to offer.
    assert renew_token(server, "inference", stale="new-token") is None


def test_no_key_file_means_no_token_and_no_renewal(tmp_path):
    server = Server(tmp_path)
    assert server.token("inference") is None and server.api_key() is None
    assert renew_token(server, "inference", stale=None) is None
    assert ServiceClient(server, inference_url="http://127.0.0.1:1").base_url("inference") == "http://127.0.0.1:1"


def test_the_api_key_is_read_from_the_key_file(tmp_path):
    server = fake_run_dir(tmp_path)
    assert server.api_key() == "api" and server.token("management") == "m"
    assert server.headers("inference") == {"Authorization": "Bearer new-token"}


def test_only_what_the_current_start_logged_is_read(tmp_path):
    server = Server(tmp_path)
    (tmp_path / "logs").mkdir()
    old = "Traceback (most recent call last): an earlier failure\n"
    (tmp_path / "logs" / "model_log.log").write_text(old + "this start\n")
    (tmp_path / "log_offsets.json").write_text(json.dumps({"logs/model_log.log": len(old)}))
    assert server.log_since_start("logs/model_log.log") == "this start\n"
    assert "Traceback" not in server.log_tail()
    (tmp_path / "logs" / "model_log.log").write_text("rotated\n")  # shorter than the offset: read from the start
    assert server.log_since_start("logs/model_log.log") == "rotated\n"
    assert server.log_since_start("logs/console.log") == ""
