"""The input gate's figures for ``make evaluate`` / ``make evaluate-ood``, as served.

:func:`gate_report` says how many labelled (dermoscopic) images the served gate refuses, and,
on request, its refusals of folders of non-dermoscopic images, synthetic frames, clinical photos
of lesions (with what the classifier would answer if forced) and full-size dermoscopy samples,
each refusal rate with its 95 % Wilson interval. Every image goes through the served path
(:func:`lab.evaluation.serve_files`, :func:`lab.evaluation.gate_scores_of_files`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from handler.checkpoint import LoadedModel
from handler.decision import decide
from handler.labels import CLASS_CODES
from handler.settings import HandlerSettings
from lab.evaluation import ServedImages, gate_scores_of_files, serve_files
from lab.ood import PAD_TO_HAM, auroc, clinical_items, wilson_interval
from lab.synthetic_images import generate


@dataclass(frozen=True)
class GateSets:
    """What :func:`gate_report` measures beyond the labelled images (all optional).

    Attributes:
        ood: Folders of non-dermoscopic images (refused rates, AUROC of the distance against the labelled set).
        synthetic: How many synthetic frames of :mod:`lab.synthetic_images` (0: none), from ``synthetic_seed``.
        clinical: A folder of clinical photos of lesions in the PAD-UFES-20 layout (``metadata.csv``, ``images/``).
        samples: A folder of full-size dermoscopy (``*.jpg``): each refusal is a false refusal.
        batch_size: Images per forward pass.
    """

    ood: Sequence[str] = ()
    synthetic: int = 0
    synthetic_seed: int = 1
    clinical: str | None = None
    samples: str | None = None
    batch_size: int = 32


def gate_report(served_images: ServedImages, records: Sequence[Any], loaded: LoadedModel, settings: HandlerSettings,
                sets: GateSets = GateSets()) -> dict[str, Any]:
    """The input gate's refusals of the labelled images (``records``, as served in ``served_images``), by
    class, and of each of ``sets``' folders, each with its 95 % Wilson interval."""
    refused = served_images.refused.numpy()
    scores = served_images.gate_scores.numpy()
    report: dict[str, Any] = {
        "method": served_images.gate_method, "threshold": served_images.gate_threshold, "images": len(records),
        "refused": int(refused.sum()), "refusal_rate": float(refused.mean()) if len(records) else 0.0,
        "refused_by_class": {code: int(sum(1 for r, out in zip(records, refused) if out and r.label == index))
                             for index, code in enumerate(CLASS_CODES)},
        "refused_images": [r.image_id for r, out in zip(records, refused) if out],
        "interval95": list(wilson_interval(int(refused.sum()), len(records))),
    }
    folders = []
    with tempfile.TemporaryDirectory() as temporary:
        named = [(str(folder), [p for p in sorted(Path(folder).iterdir()) if p.is_file()]) for folder in sets.ood]
        if sets.synthetic:
            for frame in generate(sets.synthetic, sets.synthetic_seed):
                (Path(temporary) / frame.name).write_bytes(frame.data)
            named.append((f"synthetic frames (seed {sets.synthetic_seed})", sorted(Path(temporary).iterdir())))
        if sets.samples:
            named.append((str(sets.samples), sorted(p for p in Path(sets.samples).iterdir() if p.suffix.lower() == ".jpg")))
        for name, paths in named:
            folders.append(folder_report(name, paths, scores, loaded, settings, sets.batch_size,
                                         list_refused=name == str(sets.samples)))
    if folders:
        report["ood"] = folders
    if sets.clinical:
        report["clinical"] = clinical_report(Path(sets.clinical), loaded, settings, sets.batch_size)
    return report


def folder_report(name: str, paths: Sequence[Path], labelled_scores: np.ndarray, loaded: LoadedModel,
                  settings: HandlerSettings, batch_size: int, list_refused: bool = False) -> dict[str, Any]:
    """The gate's refusals of one folder's files (those refused before the gate count as refused)."""
    ood_scores, early, gate_refused, reasons = gate_scores_of_files(loaded, paths, batch_size, settings.decode_limits)
    ood_scores = ood_scores.numpy()
    refused_here = int(gate_refused.sum()) + len(early)
    return {"folder": name, "images": len(paths), "refused": refused_here,
            "refusal_rate": refused_here / len(paths) if paths else 0.0,
            "interval95": list(wilson_interval(refused_here, len(paths))),
            "reasons": {str(r): reasons.count(r) for r in sorted(set(reasons) - {None})},
            "refused_before_gate": early,
            "refused_images": [p.name for p, out in zip([p for p in paths if p.name not in early], gate_refused) if out]
            if list_refused else None,
            "auroc": auroc(labelled_scores, ood_scores) if len(ood_scores) else float("nan"),
            "score_median": float(np.median(ood_scores)) if len(ood_scores) else None}


def clinical_report(folder: Path, loaded: LoadedModel, settings: HandlerSettings, batch_size: int = 32
                    ) -> dict[str, Any]:
    """The gate on clinical photos of lesions (refusals by reason), and the classifier's answers had it been forced.

    The forced answers are scored over the classes PAD-UFES-20 shares with HAM10000 (its ``SCC``
    has none): balanced accuracy is the mean recall of those classes, with a bootstrap interval
    (photos resampled within each class).
    """
    items = clinical_items(folder)
    served_images = serve_files(loaded, [str(folder / "images" / item.name) for item in items], settings.tta,
                                batch_size, settings.decode_limits)
    refused = served_images.refused.numpy()
    reasons = served_images.gate_reasons or []
    calibration = loaded.calibration(settings.tta)
    called = decide(served_images.probabilities, settings.decision_rule, calibration.class_prior).numpy()
    shared = sorted(set(PAD_TO_HAM.values()), key=CLASS_CODES.index)
    truth = np.array([CLASS_CODES.index(PAD_TO_HAM[item.label]) if item.label in PAD_TO_HAM else -1 for item in items])

    def balanced(mask: np.ndarray) -> float:
        recalls = [float((called[mask & (truth == c)] == c).mean()) for c in map(CLASS_CODES.index, shared)
                   if (mask & (truth == c)).any()]
        return float(np.mean(recalls)) if recalls else float("nan")

    kept = truth >= 0
    present = [c for c in map(CLASS_CODES.index, shared) if (truth == c).any()]
    rng = np.random.default_rng(0)
    resamples = []
    for _ in range(1000):  # cheap: a few hundred photos
        index = np.concatenate([rng.choice(np.flatnonzero(truth == c), int((truth == c).sum())) for c in present])
        resamples.append(np.mean([float((called[index][truth[index] == c] == c).mean()) for c in present]))
    low, high = (np.quantile(resamples, [0.025, 0.975]).tolist() if resamples else [float("nan")] * 2)
    return {
        "folder": str(folder), "images": len(items), "refused": int(refused.sum()),
        "refusal_rate": float(refused.mean()) if len(items) else float("nan"),
        "interval95": list(wilson_interval(int(refused.sum()), len(items))),
        "reasons": {str(r): reasons.count(r) for r in sorted(set(reasons) - {None})},
        "forced_answers": {
            "classes": shared, "images": int(kept.sum()), "decision_rule": settings.decision_rule,
            "balanced_accuracy": balanced(kept), "interval95": [low, high],
            "recall": {code: float((called[truth == CLASS_CODES.index(code)] == CLASS_CODES.index(code)).mean())
                       for code in shared if (truth == CLASS_CODES.index(code)).any()},
            "called": {code: int((called[kept] == i).sum()) for i, code in enumerate(CLASS_CODES)},
            "balanced_accuracy_of_accepted": balanced(kept & ~refused),
            "accepted": int((kept & ~refused).sum()),
        },
    }


def format_gate_report(report: dict[str, Any]) -> str:
    """The input gate's lines of ``scripts/evaluate.py``'s summary: the labelled images it refuses and the
    figures on those it accepts, then each measured folder and the clinical photos.

    Args:
        report: An evaluation report holding ``input_gate`` (:func:`gate_report`), ``balanced_accuracy``
            and, when any image was accepted, ``accepted``.
    """
    gate = report["input_gate"]
    low, high = gate["interval95"]
    lines = [f"input gate {gate['method']} (threshold {gate['threshold']:.4f}): refuses {gate['refused']} of "
             f"{gate['images']} labelled images ({gate['refusal_rate']:.2%}); on the accepted images balanced accuracy "
             f"{report.get('accepted', {}).get('balanced_accuracy', float('nan')):.4f} (all images "
             f"{report['balanced_accuracy']:.4f})",
             f"  labelled dermoscopy falsely refused {gate['refusal_rate']:.2%} (95 % {low:.2%}-{high:.2%})"]
    for folder in gate.get("ood", []):
        low, high = folder["interval95"]
        lines.append(f"  {folder['folder']}: refuses {folder['refused']} of {folder['images']} ({folder['refusal_rate']:.2%}, "
                     f"95 % {low:.2%}-{high:.2%}; reasons {folder['reasons']}), {len(folder['refused_before_gate'])} refused "
                     f"before the gate; AUROC of the distance against the labelled images {folder['auroc']:.5f}")
    if "clinical" in gate:
        clinical = gate["clinical"]
        low, high = clinical["interval95"]
        forced = clinical["forced_answers"]
        lines.append(f"  clinical photos {clinical['folder']}: refuses {clinical['refused']} of {clinical['images']} "
                     f"({clinical['refusal_rate']:.2%}, 95 % {low:.2%}-{high:.2%}; reasons {clinical['reasons']}); forced "
                     f"to answer, balanced accuracy over {forced['classes']} {forced['balanced_accuracy']:.3f} "
                     f"(95 % {forced['interval95'][0]:.3f}-{forced['interval95'][1]:.3f}, {forced['images']} photos)")
    return "\n".join(lines)
