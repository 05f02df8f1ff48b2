"""TorchServe entry point: a thin ``BaseHandler`` subclass over :mod:`handler.inference`."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.checkpoint import load_checkpoint
from handler.inference import BatchTimings, handle_batch, prepare_for_serving
from handler.metrics import batch_metric_updates, publish
from handler.settings import HandlerSettings

logger = logging.getLogger(__name__)


def select_device(properties: dict[str, Any]) -> torch.device:
    """The GPU TorchServe assigned to this worker, or the CPU when there is none."""
    gpu_id = properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def body_content_type(context: Any, index: int) -> str | None:
    """The Content-Type the request's body arrived with (TorchServe keeps one per input name)."""
    for name in ("body", "data"):
        header = context.get_request_header(index, name)
        if isinstance(header, dict) and header.get("content-type"):
            return str(header["content-type"])
    return None


class SkinLesionHandler(BaseHandler):
    """Loads the archive's serialized checkpoint and serves batched predictions."""

    def initialize(self, context: Any) -> None:
        """Load settings and model; TorchServe calls this once per worker."""
        properties = context.system_properties
        self.settings = HandlerSettings.from_mapping((context.model_yaml_config or {}).get("handler"))
        self.device = select_device(properties)
        manifest = context.manifest["model"]
        checkpoint = os.path.join(properties["model_dir"], manifest["serializedFile"])
        self.loaded = load_checkpoint(checkpoint, self.device)
        prepare_for_serving(self.loaded, self.settings)  # problems fail the worker's load, not a request
        self.model_version = manifest.get("modelVersion") or self.loaded.version
        self.model_name = manifest.get("modelName", "skin_lesion")
        self.initialized = True
        logger.info("loaded %s (%s, version %s) on %s: runtime %s, precision %s, TTA %s, %d threads", checkpoint,
                    self.loaded.architecture, self.model_version, self.device, self.settings.runtime,
                    self.settings.precision, self.settings.tta, torch.get_num_threads())

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """Answer one batch; each request gets its own status code and JSON body.

        TorchServe's own explain switch looks at the first request only; here each request
        of a mixed batch is asked whether it came through ``/explanations``.
        """
        explain = [context.get_request_header(index, "explain") == "True" for index in range(len(data))]
        content_types = [body_content_type(context, index) for index in range(len(data))]
        timings = BatchTimings()
        responses = handle_batch(self.loaded, self.settings, data, self.model_version, explain, timings, content_types,
                                 self.model_name)
        publish(context.metrics, batch_metric_updates(self.model_name, responses, explain, timings))
        bodies = []
        for index, response in enumerate(responses):
            context.set_response_status(code=response.status, phrase="", idx=index)
            context.set_response_content_type(index, "application/json")
            bodies.append(json.dumps(response.to_json(), separators=(",", ":")))
        return bodies
