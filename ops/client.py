"""HTTP calls to this project's TorchServe with its tokens, renewed when they have expired.

Token policy (docs/OPERATIONS.md, "Tokens and exposure"; SECURITY.md): TorchServe 0.12 gives
the inference and management tokens a lifetime (``token_expiration_min`` in
``config/config.properties``, 24 h) and never renews them by itself. Its token API does:
``POST /token?type=inference|management`` on the management port, authorized by the ``API`` key
of the same ``key_file.json``, replaces that token (the old one stops working at once) and
rewrites the key file. Every tool of this project that calls the server (``wait_ready``,
``scripts/serve.py predict``, rollouts and status, soak, bench, the demo) goes through
:class:`ServiceClient`: a request refused for its token re-reads the key file (another client
may have renewed the token already), renews the token if not, and is sent once more. Renewals
are serialized by a lock file in the run folder, so that two clients never replace each
other's fresh token.

This module imports only ``requests`` and the standard library: the load generator's client
process imports it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import requests

from ops.paths import MODEL_NAME

if TYPE_CHECKING:
    from ops.torchserve import Server

logger = logging.getLogger(__name__)

TOKEN_LOCK = "token.lock"
TOKEN_APIS = ("inference", "management")


def is_token_refusal(response: requests.Response) -> bool:
    """Whether TorchServe refused a request for its token (missing, wrong or expired).

    TorchServe 0.12 answers those with HTTP 400 or 401 and the message "Token Authorization
    failed. Token either incorrect, expired, or not provided correctly".
    """
    if response.status_code not in (400, 401):
        return False
    text = response.text.lower()
    return "token" in text and ("expired" in text or "incorrect" in text)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def renew_token(server: Server, api: str, stale: str | None, timeout: float = 10.0) -> str | None:
    """A working token for ``api`` after ``stale`` was refused.

    If the key file already holds another token (someone renewed it since ``stale`` was read),
    that one; otherwise a new one from TorchServe's token API, which rewrites the key file.

    Args:
        server: The instance whose run folder holds ``key_file.json`` and ``config.properties``.
        api: ``inference`` or ``management``.
        stale: The token that was refused.
        timeout: Seconds for the token API call.

    Returns:
        The token to use, or None if none can be had (no key file, no config, or the token API
        refused): the caller keeps the refusal.
    """
    if api not in TOKEN_APIS:
        raise ValueError(f"tokens exist for {TOKEN_APIS}, not {api!r}")
    if server.keys() is None or not (server.run_dir / "config.properties").exists():
        return None
    with _exclusive(server.run_dir / TOKEN_LOCK):
        current = server.token(api)
        if current is not None and current != stale:
            return current
        api_key = server.api_key()
        if api_key is None:
            return None
        try:
            response = requests.post(f"{server.url('management')}/token", params={"type": api},
                                     headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
        except requests.RequestException as error:
            logger.warning("could not renew the %s token: %s", api, error)
            return None
        if not response.ok:
            logger.warning("TorchServe refused to renew the %s token: HTTP %s %s", api, response.status_code,
                           response.text.strip()[:200])
            return None
        renewed = server.token(api)
        logger.info("renewed the %s token of the server in %s", api, server.run_dir)
        return renewed if renewed != stale else None


class ServiceClient:
    """Requests to one TorchServe instance, authorized from its run folder's key file.

    Thread-safe: each thread keeps its own ``requests`` session. Request bodies must be bytes
    or JSON (not open files): a request refused for its token is sent a second time.

    Attributes:
        server: The instance (its run folder holds the key file and the addresses).
        timeout: Default seconds per request.
    """

    def __init__(self, server: Server, inference_url: str | None = None, timeout: float = 60.0) -> None:
        """
        Args:
            server: The instance.
            inference_url: Base URL of the inference API when it differs from the run folder's
                ``config.properties`` (a server reached through another address).
            timeout: Default seconds per request.
        """
        self.server = server
        self.timeout = timeout
        self._inference_url = inference_url.rstrip("/") if inference_url else None
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        """This thread's session."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def base_url(self, api: str) -> str:
        """Base URL of ``inference``, ``management`` or ``metrics``."""
        if api == "inference" and self._inference_url:
            return self._inference_url
        return self.server.url(api)

    def _send(self, api: str, method: str, path: str, token: str | None, timeout: float | None,
              kwargs: dict[str, Any]) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.request(method, f"{self.base_url(api)}{path}", headers=headers,
                                    timeout=self.timeout if timeout is None else timeout, **kwargs)

    def request(self, api: str, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        """One call to ``api`` (``inference``, ``management`` or ``metrics``); a token refusal is renewed and retried once.

        Raises:
            requests.RequestException: As ``requests`` does (connection refused, timeout).
        """
        token = self.server.token(api) if api in TOKEN_APIS else None
        response = self._send(api, method, path, token, timeout, dict(kwargs))
        if token is not None and is_token_refusal(response):
            renewed = renew_token(self.server, api, token)
            if renewed is not None:
                response = self._send(api, method, path, renewed, timeout, dict(kwargs))
        return response

    def predict(self, version: str | None = None, model: str = MODEL_NAME, **kwargs: Any) -> requests.Response:
        """``POST /predictions/<model>[/<version>]`` with ``data=`` (raw bytes) or ``json=``."""
        return self.request("inference", "POST", f"/predictions/{model}" + (f"/{version}" if version else ""), **kwargs)

    def ping(self, timeout: float | None = None) -> requests.Response:
        """``GET /ping`` (the inference token is needed for it too)."""
        return self.request("inference", "GET", "/ping", timeout=timeout)
