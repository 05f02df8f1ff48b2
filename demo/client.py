"""Where the demo's predictions come from: the running TorchServe, or the handler code in-process.

Both backends send the same request (``{"image": <base64>, "gradcam": true, "target_class": ...}``)
and return the same response body, so the page cannot tell them apart. Every failure a
person can cause or meet (a bad image, an image that is not dermoscopy, a server that is down)
becomes a :class:`DemoError` whose message is meant to be shown on the page as it is; an image
the model's input gate refuses is an :class:`OutOfDistribution`, with its score. Tokens are the
server's (read from its run folder, renewed when they expire: :class:`ops.client.ServiceClient`).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import requests

from handler.checkpoint import LoadedModel, load_checkpoint, read_checkpoint
from handler.inference import handle_batch
from handler.preprocessing import PreprocessConfig
from handler.settings import HandlerSettings
from ops.archive import ArchiveSpec, ReleaseCheckError, build_archive
from ops.client import ServiceClient
from ops.paths import CHECKPOINT, MODEL_CONFIG, MODEL_NAME, MODEL_STORE, SERVER_CONFIG
from ops.rollout import RolloutError, start_serving
from ops.torchserve import Server

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
REQUEST_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0
OUT_OF_DISTRIBUTION = "out_of_distribution"
NOT_DERMOSCOPY = "not_dermoscopy"  # the gate's refusal of a clinical photo (skin photographed without a dermatoscope)


class DemoError(Exception):
    """A failure explained in words a person using the demo can act on."""


class OutOfDistribution(DemoError):
    """The model's input gate judged the image not to be a dermoscopic photo of a skin lesion (HTTP 422).

    Attributes:
        score: The gate's out-of-distribution score (higher = less like dermoscopy), or None.
        threshold: The score above which images are refused, or None.
        modality: What the gate took the image for: ``clinical`` (a photo of skin taken without a
            dermatoscope, code ``not_dermoscopy``) or ``other``.
        advice: What to send instead, in the server's words, or None.
    """

    def __init__(self, message: str, score: float | None, threshold: float | None, modality: str = "other",
                 advice: str | None = None) -> None:
        super().__init__(message)
        self.score = score
        self.threshold = threshold
        self.modality = modality
        self.advice = advice


class Backend(Protocol):
    """Anything that answers a prediction request like ``POST /predictions/skin_lesion``."""

    description: str

    def predict(self, image: bytes, target_class: str | None = None, explanation: str = "fast") -> dict[str, Any]:
        """The response body for one image, with a map of ``target_class`` (the predicted class if None) of the
        kind ``explanation`` names (``fast`` Grad-CAM or ``faithful`` LayerCAM x Grad-CAM)."""
        ...


def prediction_request(image: bytes, target_class: str | None, explanation: str = "fast") -> dict[str, Any]:
    """The JSON body the demo sends: the image in base64, always with an explanation of the asked kind."""
    body: dict[str, Any] = {"image": base64.b64encode(image).decode("ascii"), "gradcam": True,
                            "explanation": explanation}
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
    if status in (401, 403) or (status == 400 and "token" in text.lower()):
        return (f"TorchServe refused the demo's token (HTTP {status}), even after renewing it. The token is read from "
                "the run folder's key_file.json; pass --run-dir of the server you are talking to.")
    if status == 413 and not text.strip():
        return "The image is larger than the server accepts (HTTP 413)."
    detail = body.get("message") if isinstance(body, dict) and body.get("message") else text.strip()[:300]
    return f"TorchServe answered HTTP {status}: {detail or 'no details given'}."


def refusal(status: int, body: Any, text: str) -> DemoError:
    """The error to raise for a non-200 answer: :class:`OutOfDistribution` for the input gate's 422, else :class:`DemoError`."""
    error = body.get("error") if isinstance(body, dict) else None
    if status == 422 and isinstance(error, dict) and error.get("code") in (OUT_OF_DISTRIBUTION, NOT_DERMOSCOPY):
        score, threshold = error.get("score"), error.get("threshold")
        modality = "clinical" if error.get("code") == NOT_DERMOSCOPY else "other"
        advice = error.get("advice")
        return OutOfDistribution(str(error.get("message") or "out of distribution"),
                                 None if score is None else float(score), None if threshold is None else float(threshold),
                                 modality, None if advice is None else str(advice))
    return DemoError(error_message(status, body, text))


@dataclass
class RemoteBackend:
    """A client of a running TorchServe; the token comes from the run folder and is renewed when it expires.

    Attributes:
        url: Base URL of the inference API, e.g. ``http://127.0.0.1:8080``.
        server: The server's run folder, which holds ``key_file.json``.
    """

    url: str
    server: Server
    client: ServiceClient = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.client = ServiceClient(self.server, inference_url=self.url, timeout=REQUEST_TIMEOUT_S)

    @property
    def description(self) -> str:
        """Where predictions come from, for the page."""
        return f"TorchServe at {self.url}"

    def predict(self, image: bytes, target_class: str | None = None, explanation: str = "fast") -> dict[str, Any]:
        """Send one image to ``/predictions/skin_lesion``.

        Raises:
            OutOfDistribution: If the input gate refuses the image.
            DemoError: If the server is unreachable, slow, refuses the token or the image.
        """
        endpoint = f"{self.url}/predictions/{MODEL_NAME}"
        try:
            response = self.client.predict(json=prediction_request(image, target_class, explanation))
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
            error = refusal(response.status_code, body, response.text)
            logger.warning("prediction refused: %s", error)
            raise error
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

    def predict(self, image: bytes, target_class: str | None = None, explanation: str = "fast") -> dict[str, Any]:
        """Run one image through the handler code.

        Raises:
            OutOfDistribution: If the input gate refuses the image (the server's 422).
            DemoError: If the handler refuses the image (the same 4xx the server would send).
        """
        response = handle_batch(self.loaded, self.settings, [{"body": prediction_request(image, target_class, explanation)}],
                                self.loaded.version)[0]
        body = response.to_json()
        if response.status != 200:
            error = refusal(response.status, body, "")
            logger.warning("prediction refused: %s", error)
            raise error
        return body


def load_preprocess(checkpoint: Path) -> PreprocessConfig:
    """The preprocessing stored in a checkpoint's metadata, without building the model."""
    return read_checkpoint(checkpoint).meta.preprocessing


def server_answers(client: ServiceClient) -> bool:
    """Whether anything answers HTTP at the inference API's ``/ping`` (whatever the status: 401 and 500 are answers too)."""
    try:
        client.ping(timeout=PROBE_TIMEOUT_S)
    except (requests.ConnectionError, requests.Timeout) as exc:
        logger.info("no server answers at %s (%s)", client.base_url("inference"), exc.__class__.__name__)
        return False
    return True


def connect(url: str, run_dir: Path, model_store: Path = MODEL_STORE, server_config: Path = SERVER_CONFIG,
            start_if_down: bool = True, overrides: dict[str, str] | None = None,
            timeout: float = 240.0) -> tuple[RemoteBackend, Server | None]:
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
    server = Server(run_dir.resolve())
    backend = RemoteBackend(url, server)
    if server_answers(backend.client):
        return backend, None
    if not start_if_down:
        raise DemoError(f"no TorchServe answers at {url}; start it with `make serve`, or run the demo with --local")
    if server.is_running():
        raise DemoError(f"a TorchServe from {run_dir} is running (pid {server.launcher_pid}) but does not answer at "
                        f"{url}; check `make status` and the --url option")
    archive = model_store / f"{MODEL_NAME}.mar"
    if not archive.exists():
        logger.info("no %s yet: building it as `make archive` does", archive)
        try:
            build_archive(ArchiveSpec(CHECKPOINT, MODEL_CONFIG, model_store))
        except ReleaseCheckError as exc:
            raise DemoError(f"cannot build {archive}: {exc}") from exc
    logger.info("no server answers at %s: starting TorchServe from %s", url, server.run_dir)
    try:
        start_serving(server.run_dir, model_store, server_config, {"inference_address": url, **(overrides or {})},
                      timeout=timeout)
    except (RolloutError, RuntimeError, TimeoutError) as exc:
        logger.error("TorchServe did not start: %s", exc)
        raise DemoError(f"TorchServe did not start: {str(exc).splitlines()[0]} (logs in {server.run_dir / 'logs'})") from exc
    return backend, server
