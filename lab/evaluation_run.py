"""One run of ``scripts/evaluate.py``: a checkpoint evaluated on labelled images exactly as the service
would answer them, and the files that run writes.

:func:`evaluation_settings` takes the served settings of the model config (TTA mode, decision rule and
referral threshold may be overridden); :func:`evaluate_checkpoint` serves the images through
:func:`lab.evaluation.serve_files` and builds the report (figures under every decision rule, calibration,
reliability, bootstrap intervals, and the input gate's refusals when the checkpoint has a gate,
:func:`lab.gate_evaluation.gate_report`); :func:`write_evaluation` writes ``metrics.json``,
``predictions.csv`` and the two figures.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from handler.checkpoint import load_checkpoint
from handler.decision import DECISION_RULES, decide
from handler.inference import prepare_for_serving
from handler.labels import CLASS_CODES
from handler.settings import HandlerSettings, load_handler_settings
from lab.data import LabelledImage
from lab.evaluation import bootstrap_intervals, classification_report, reliability_bins, serve_files
from lab.gate_evaluation import GateSets, gate_report
from lab.plots import plot_confusion_matrix, plot_reliability


@dataclass
class Evaluation:
    """A checkpoint's answers on labelled images, and the report of them.

    Attributes:
        records: The labelled images, in order.
        version: The checkpoint's version.
        tta: The test-time augmentation mode used.
        probabilities: (N, 7) calibrated probabilities, as served.
        calls: (N,) the class the decision rule calls for each image.
        report: What ``metrics.json`` holds.
    """

    records: Sequence[LabelledImage]
    version: str
    tta: str
    probabilities: np.ndarray
    calls: np.ndarray
    report: dict[str, Any]


def evaluation_settings(model_config: str | Path, tta: str | None = None, decision_rule: str | None = None,
                        referral_threshold: float | None = None) -> HandlerSettings:
    """The served settings of ``model_config``, with these overrides where given (None keeps the served one).

    The served runtime and precision are kept; all cores, since evaluation is one process. A candidate is
    evaluated before its input gate is fitted, so a gate is used when there is one, not required.
    """
    served = load_handler_settings(model_config)
    threshold = referral_threshold if referral_threshold is not None else served.referral_threshold
    return dataclasses.replace(served, tta=tta or served.tta, decision_rule=decision_rule or served.decision_rule,
                               referral_threshold=threshold, torch_threads=0, require_input_gate=False)


def evaluate_checkpoint(checkpoint: str | Path, records: Sequence[LabelledImage], settings: HandlerSettings,
                        batch_size: int = 32, bootstrap: int = 1000, gate_sets: GateSets = GateSets()) -> Evaluation:
    """Serve ``records``' images with ``checkpoint`` as the service would under ``settings``, and report.

    Args:
        checkpoint: Release-format checkpoint.
        records: Labelled images.
        settings: Served settings (:func:`evaluation_settings`): runtime, TTA, decision rule, referral threshold.
        batch_size: Images per forward pass.
        bootstrap: Resamples for the 95 % intervals of the headline figures (0: none).
        gate_sets: What the input gate is measured on beyond the labelled images (with a gate only).

    Returns:
        The answers and the report: the figures of all images, and with a gate its refusals
        (``input_gate``) and the figures of the accepted images alone (``accepted``).
    """
    tta, rule, threshold = settings.tta, settings.decision_rule, settings.referral_threshold
    loaded = load_checkpoint(checkpoint)
    prepare_for_serving(loaded, settings)
    calibration = loaded.calibration(tta)
    print(f"evaluating {len(records)} images with {checkpoint} (version {loaded.version}), TTA {tta}, "
          f"decision rule {rule}, "
          f"{settings.runtime} {settings.precision}, referral threshold {threshold}", flush=True)
    served_images = serve_files(loaded, [r.path for r in records], tta, batch_size, settings.decode_limits)
    probs = served_images.probabilities.numpy()
    labels = np.array([r.label for r in records])
    called = {name: decide(served_images.probabilities, name, calibration.class_prior).numpy() for name in DECISION_RULES
              if name == "most_probable" or calibration.class_prior is not None}
    report = classification_report(probs, labels, threshold, called[rule])
    report.update(checkpoint=str(checkpoint), model_version=loaded.version, tta=tta, decision_rule=rule,
                  balanced_accuracy_by_rule={name: classification_report(probs, labels, threshold, calls)["balanced_accuracy"]
                                             for name, calls in called.items()},
                  calibration=calibration.to_dict(), reliability=reliability_bins(probs, labels))
    if bootstrap:
        report["bootstrap"] = bootstrap_intervals(probs, labels, called[rule], threshold, bootstrap)
    if served_images.gate_scores is not None:
        report["input_gate"] = gate_report(served_images, records, loaded, settings, gate_sets)
        accepted = ~served_images.refused.numpy()
        if accepted.any():
            report["accepted"] = {key: value for key, value in classification_report(
                probs[accepted], labels[accepted], threshold, called[rule][accepted]).items()
                if key not in ("per_class", "confusion_matrix")}
    return Evaluation(records, loaded.version, tta, probs, called[rule], report)


def write_evaluation(evaluation: Evaluation, out: Path) -> None:
    """Write ``metrics.json`` (the report), ``predictions.csv`` (label, call and probabilities per image),
    ``confusion_matrix.png`` and ``reliability.png`` into ``out``."""
    report = evaluation.report
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with open(out / "predictions.csv", "w") as handle:
        handle.write("image_id,label,prediction," + ",".join(report["per_class"]) + "\n")
        for record, call, row in zip(evaluation.records, evaluation.calls, evaluation.probabilities):
            handle.write(f"{record.image_id},{CLASS_CODES[record.label]},{CLASS_CODES[call]},"
                         + ",".join(f"{p:.6f}" for p in row) + "\n")
    plot_confusion_matrix(report["confusion_matrix"], out / "confusion_matrix.png",
                          f"{evaluation.version}, {len(evaluation.records)} images, "
                          f"balanced accuracy {report['balanced_accuracy']:.3f}")
    plot_reliability(report["reliability"], report["ece"], out / "reliability.png",
                     f"{evaluation.version}, TTA {evaluation.tta}")
