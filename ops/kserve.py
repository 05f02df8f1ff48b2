"""The storage layout KServe's TorchServe runtime serves: ``config/config.properties`` plus ``model-store/*.mar``.

KServe (model format ``pytorch``, runtime ``kserve-torchserve`` or the project's own
``deploy/kserve/servingruntime.yaml``) downloads the InferenceService's ``storageUri`` to
``/mnt/models`` and starts
``torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``.
:func:`write_bundle` lays that out from the release archive, the cluster configuration
``deploy/kserve/config.properties`` and the metrics declaration ``config/metrics.yaml``.

Why that configuration serves without a KServe envelope, and what it means for clients, is
written in ``deploy/kserve/config.properties`` and docs/SCALING.md; the command line is
``scripts/kserve_bundle.py`` (``make kserve-bundle``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ops.paths import METRICS_CONFIG, MODEL_NAME, ROOT
from ops.rollout import archive_version, check_digest
from ops.torchserve import read_properties, render_properties

MOUNT = "/mnt/models"
BUNDLE_CONFIG = ROOT / "deploy" / "kserve" / "config.properties"
# KServe's runtime command, as its ClusterServingRuntime spells it, plus --ncs: TorchServe 0.12
# turns config snapshots off only on its command line (the project's ServingRuntime,
# Deployment and image all pass it; the image's entrypoint adds it when missing).
RUNTIME_ARGS = ("torchserve", "--start", f"--model-store={MOUNT}/model-store",
                f"--ts-config={MOUNT}/config/config.properties", "--ncs")


def write_bundle(archive: Path, out: Path, config: Path = BUNDLE_CONFIG, metrics: Path = METRICS_CONFIG) -> Path:
    """Write ``out/config/{config.properties,metrics.yaml}`` and ``out/model-store/skin_lesion.mar``.

    Args:
        archive: The release ``.mar``.
        out: The bundle folder (replaced if it exists).
        config: The pod's config.properties.
        metrics: The metrics declaration it points at.

    Returns:
        ``out``.

    Raises:
        ValueError: If the config does not load ``skin_lesion.mar`` from ``/mnt/models`` or the
            archive is not a readable model archive.
        RolloutError: If the archive does not match its recorded SHA-256 (or has none).
    """
    properties = read_properties(config)
    expected = {"model_store": f"{MOUNT}/model-store", "load_models": f"{MODEL_NAME}={MODEL_NAME}.mar",
                "metrics_config": f"{MOUNT}/config/metrics.yaml"}
    wrong = {key: properties.get(key) for key, value in expected.items() if properties.get(key) != value}
    if wrong:
        raise ValueError(f"{config} must set {expected}; it has {wrong}")
    version = archive_version(archive)
    # Only an archive that matches the SHA-256 recorded when it was built goes into a bundle.
    check_digest(archive)
    if out.exists():
        shutil.rmtree(out)
    (out / "config").mkdir(parents=True)
    (out / "model-store").mkdir()
    shutil.copy2(config, out / "config" / "config.properties")
    shutil.copy2(metrics, out / "config" / "metrics.yaml")
    shutil.copy2(archive, out / "model-store" / f"{MODEL_NAME}.mar")
    print(f"wrote {out}: config/config.properties, config/metrics.yaml, model-store/{MODEL_NAME}.mar (version {version})")
    return out


def localized_config(bundle: Path, ports: dict[str, int]) -> str:
    """The bundle's config.properties as it would run from ``bundle`` instead of ``/mnt/models``, on loopback ports.

    Only for running the bundle on this machine (tests): ``ports`` maps ``inference``,
    ``management``, ``metrics``, ``grpc_inference`` and ``grpc_management`` to free ports.
    """
    text = (bundle / "config" / "config.properties").read_text().replace(MOUNT, str(bundle))
    overrides = {"inference_address": f"http://127.0.0.1:{ports['inference']}",
                 "management_address": f"http://127.0.0.1:{ports['management']}",
                 "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
                 "grpc_inference_port": str(ports["grpc_inference"]),
                 "grpc_management_port": str(ports["grpc_management"])}
    staging = bundle / "config" / ".localized"
    staging.write_text(text)
    try:
        return render_properties(staging, overrides)
    finally:
        staging.unlink()


def runtime_command(bundle: Path) -> list[str]:
    """KServe's runtime command with ``/mnt/models`` replaced by ``bundle``."""
    return [re.sub(f"^(--[a-z-]+=){re.escape(MOUNT)}", lambda m: m.group(1) + str(bundle), arg) for arg in RUNTIME_ARGS]
