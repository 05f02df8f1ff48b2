"""Where the demo's predictions come from: the running TorchServe, or the handler code in-process.

Both backends send the same request (``{"image": <base64>, "gradcam": true, "target_class": ...}``)
and return the same response body, so the page cannot tell them apart. Every failure a
person can cause or meet (a bad image, a server that is down, a stale token) becomes a
:class:`DemoError` whose message is meant to be shown on the page as it is.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import requests
import torch

from handler.inference import HandlerSettings, handle_batch, load_handler_settings  # noqa: F401 (re-exported for app and notebook)
from handler.model import LoadedModel, load_checkpoint
from handler.preprocessing import PreprocessConfig
from scripts import package, serve

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_RUN_DIR = ROOT / "run"
DEFAULT_CHECKPOINT = ROOT / "models" / "skin_lesion.pt"
DEFAULT_MODEL_CONFIG = ROOT / "config" / "model-config.yaml"
DEFAULT_MODEL_STORE = ROOT / "model_store"
DEFAULT_SERVER_CONFIG = ROOT / "config" / "config.properties"
REQUEST_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0


class DemoError(Exception):
    """A failure explained in words a person using the demo can act on."""


class Backend(Protocol):
    """Anything that answers a prediction request like ``POST /predictions/skin_lesion``."""

    description: str

    def predict(self, image: bytes, target_class: str | None = None) -> dict[str, Any]:
        """The response body for one image, with a Grad-CAM of ``target_class`` (the predicted class if None)."""
        ...


def prediction_request(image: bytes, target_class: str | None) -> dict[str, Any]:
    """The JSON body the demo sends: the image in base64, always with a Grad-CAM."""
    body: dict[str, Any] = {"image": base64.b64encode(image).decode("ascii"), "gradcam": True}
    if target_class:
        body["target_class"] = target_class
    return body


def error_message(status: int, body: Any, text: str) -> str:
    """A readable sentence for an error answer of the handler or of TorchServe itself.

    Args:
        status: The HTTP status code.
        body: The parsed JSON body, or None if it was not JSON.
        text: The raw body, used when it is not one of the known JSON shapes.
    """
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return f"The server says: {error.get('message')} ({error.get('code')}, HTTP {status})."
    if status in (401, 403):
        return (f"TorchServe refused the demo's token (HTTP {status}). The token is read from the run folder's "
                "key_file.json; pass --run-dir of the server you are talking to.")
    if status == 413 and not text.strip():
        return "The image is larger than the server accepts (HTTP 413)."
    detail = body.get("message") if isinstance(body, dict) and body.get("message") else text.strip()[:300]
    return f"TorchServe answered HTTP {status}: {detail or 'no details given'}."


@dataclass
class RemoteBackend:
    """A client of a running TorchServe; the token is re-read from the run folder for every request.

    Attributes:
        url: Base URL of the inference API, e.g. ``http://127.0.0.1:8080``.
        server: The server's run folder, which holds ``key_file.json``.
    """

    url: str
    server: serve.Server

    @property
    def description(self) -> str:
        """Where predictions come from, for the page."""
        return f"TorchServe at {self.url}"

    def predict(self, image: bytes, target_class: str | None = None) -> dict[str, Any]:
        """Send one image to ``/predictions/skin_lesion``.

        Raises:
            DemoError: If the server is unreachable, slow, refuses the token or the image.
        """
        endpoint = f"{self.url}/predictions/{serve.MODEL_NAME}"
        try:
            # Tokens expire (token_expiration_min); the key file always holds the current one.
            response = requests.post(endpoint, json=prediction_request(image, target_class),
                                     headers=self.server.headers("inference"), timeout=REQUEST_TIMEOUT_S)
        except requests.ConnectionError as exc:
            logger.warning("TorchServe unreachable at %s: %s", endpoint, exc)
            raise DemoError(f"TorchServe is not answering at {self.url}. Start it with `make serve` "
                            "(or run the demo with --local), then try again.") from exc
        except requests.Timeout as exc:
            logger.warning("TorchServe timed out at %s: %s", endpoint, exc)
            raise DemoError(f"TorchServe at {self.url} did not answer within {REQUEST_TIMEOUT_S:.0f} s; "
                            "it may be overloaded. Try again in a moment.") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            message = error_message(response.status_code, body, response.text)
            logger.warning("prediction failed: %s", message)
            raise DemoError(message)
        return body


@dataclass
class LocalBackend:
    """The serving code (:func:`handler.inference.handle_batch`) run in this process, without TorchServe.

    Attributes:
        checkpoint: The checkpoint to load.
        settings: The handler settings, as the server reads them from ``model-config.yaml``.
    """

    checkpoint: Path
    settings: HandlerSettings
    loaded: LoadedModel = field(init=False)

    def __post_init__(self) -> None:
        self.loaded = load_checkpoint(self.checkpoint)

    @property
    def description(self) -> str:
        """Where predictions come from, for the page."""
        return f"in-process handler ({self.checkpoint.name})"

    def predict(self, image: bytes, target_class: str | None = None) -> dict[str, Any]:
        """Run one image through the handler code.

        Raises:
            DemoError: If the handler refuses the image (the same 4xx the server would send).
        """
        response = handle_batch(self.loaded, self.settings, [{"body": prediction_request(image, target_class)}],
                                self.loaded.version)[0]
        if response.status != 200:
            message = error_message(response.status, response.body, "")
            logger.warning("prediction failed: %s", message)
            raise DemoError(message)
        return response.body


def load_preprocess(checkpoint: Path) -> PreprocessConfig:
    """The preprocessing stored in a checkpoint's metadata, without building the model."""
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    return PreprocessConfig.from_dict(meta["preprocessing"])


def server_answers(url: str, headers: dict[str, str]) -> bool:
    """Whether anything answers HTTP at ``url``'s ``/ping`` (whatever the status: 401 and 500 are answers too)."""
    try:
        requests.get(f"{url}/ping", headers=headers, timeout=PROBE_TIMEOUT_S)
    except (requests.ConnectionError, requests.Timeout) as exc:
        logger.info("no server answers at %s (%s)", url, exc.__class__.__name__)
        return False
    return True


def connect(url: str, run_dir: Path, model_store: Path = DEFAULT_MODEL_STORE, server_config: Path = DEFAULT_SERVER_CONFIG,
            start_if_down: bool = True, overrides: dict[str, str] | None = None,
            timeout: float = 240.0) -> tuple[RemoteBackend, serve.Server | None]:
    """A backend for the TorchServe at ``url``, starting one from ``run_dir`` (as ``make serve`` does) if none answers.

    Args:
        url: Base URL of the inference API.
        run_dir: The server's run folder (``key_file.json``, config, logs, pids).
        model_store: Where the ``.mar`` is, or is built if missing.
        server_config: Base ``config.properties`` for a server started here.
        start_if_down: Start a server when none answers; otherwise fail.
        overrides: Further ``config.properties`` values for a server started here (other ports, for example).
        timeout: Seconds to wait for a started server's model to be READY.

    Returns:
        The backend, and the server this call started (None if it was already running).

    Raises:
        DemoError: If no server answers and none could be started.
    """
    server = serve.Server(run_dir.resolve())
    if server_answers(url, server.headers("inference")):
        return RemoteBackend(url, server), None
    if not start_if_down:
        raise DemoError(f"no TorchServe answers at {url}; start it with `make serve`, or run the demo with --local")
    if server.is_running():
        raise DemoError(f"a TorchServe from {run_dir} is running (pid {server.launcher_pid}) but does not answer at "
                        f"{url}; check `make status` and the --url option")
    archive = model_store / f"{serve.MODEL_NAME}.mar"
    if not archive.exists():
        logger.info("no %s yet: building it as `make archive` does", archive)
        package.main(package.get_args_parser().parse_args(["--export-path", str(model_store)]))
    logger.info("no server answers at %s: starting TorchServe from %s", url, server.run_dir)
    serve.start(server.run_dir, model_store, server_config, {"inference_address": url, **(overrides or {})})
    try:
        serve.wait_ready(server, timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        serve.stop(server)
        logger.error("TorchServe did not start: %s", exc)
        raise DemoError(f"TorchServe did not start: {str(exc).splitlines()[0]} (logs in {server.run_dir / 'logs'})") from exc
    return RemoteBackend(url, server), server
