"""The out-of-distribution input gate: exact scoring, a weights-only stored dict, the threshold rule, synthetic cases."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handler.input_gate import (GATE_FORMAT, MODALITIES, InputGate, build_gate_backbone, cosine_knn_scores, gate_input,
                                mahalanobis_scores, make_gate_dict)
from handler.preprocessing import decode_image
from handler.storage import unpack_state_dict
from lab import ood
from lab.synthetic_images import KINDS, MAX_ASPECT, generate
from ops.paths import DATA, VAL_SPLIT



def brute_force_knn(features: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """One minus the mean of the k largest cosine similarities, one pair at a time."""
    scores = []
    for f in features.double():
        sims = sorted((float(F.cosine_similarity(f, r.double(), dim=0)) for r in reference), reverse=True)
        scores.append(1.0 - sum(sims[:k]) / k)
    return torch.tensor(scores, dtype=torch.float64)


def brute_force_mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    scores = []
    for f in features.double():
        scores.append(min(float((f - m.double()) @ precision.double() @ (f - m.double())) for m in means))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.fixture(scope="module")
def backbone_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_gate_backbone().state_dict()


def tiny_gate_dict(state: dict[str, torch.Tensor], storage: str = "float16", scorer: str = "cosine_knn") -> dict:
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(40, 1280, generator=generator)
    extra = {"k": 3, "reference": reference} if scorer == "cosine_knn" else {
        "means": torch.randn(3, 1280, generator=generator) * 0.1,
        "whitening": torch.eye(1280) + 0.01 * torch.randn(1280, 1280, generator=generator).tril()}
    return make_gate_dict(state, method=f"test-32-{scorer}", input_size=32, scorer=scorer, threshold=0.5,
                          storage=storage, provenance={"note": "random weights"}, **extra)


def test_cosine_knn_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    features, reference = torch.randn(6, 16, generator=generator), torch.randn(25, 16, generator=generator)
    unit = F.normalize(reference, dim=1)
    for k in (1, 4, 25):
        assert torch.allclose(cosine_knn_scores(features, unit, k).double(), brute_force_knn(features, reference, k), atol=1e-6)


def test_mahalanobis_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    precision = a @ a.T + 12 * torch.eye(12, dtype=torch.float64)
    whitening = torch.linalg.cholesky(precision)  # precision = L L^T
    features, means = torch.randn(5, 12, generator=generator), torch.randn(3, 12, generator=generator)
    expected = brute_force_mahalanobis(features, means, precision)
    got = mahalanobis_scores(features, means, whitening.float()).double()
    assert torch.allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_gate_scores_match_an_independent_pipeline(backbone_state: dict, storage: str) -> None:
    """Served scoring = antialiased resize, (x/255 - mean)/std, the stored weights, brute-force kNN."""
    stored = tiny_gate_dict(backbone_state, storage)
    gate = InputGate.from_dict(stored)
    batch = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))

    network = build_gate_backbone().eval()
    network.load_state_dict(unpack_state_dict(stored["state_dict"]))
    x = F.interpolate(batch.float() / 255.0, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        features = network((x - 0.5) / 0.5)
    expected = brute_force_knn(features, stored["reference"].float(), k=3)
    assert torch.allclose(gate.score(batch).double(), expected, atol=1e-5)
    assert gate.score(batch).shape == (3,)


def test_batched_scoring_equals_one_at_a_time(backbone_state: dict) -> None:
    gate = InputGate.from_dict(tiny_gate_dict(backbone_state))
    batch = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    one_by_one = torch.cat([gate.score(batch[i:i + 1]) for i in range(4)])
    assert torch.allclose(gate.score(batch), one_by_one, atol=1e-5)


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (torch.Tensor, str, int, float, bool, type(None)))


@pytest.mark.parametrize("scorer", ["cosine_knn", "mahalanobis"])
def test_to_dict_round_trip_loads_weights_only(backbone_state: dict, scorer: str) -> None:
    gate = InputGate.from_dict(tiny_gate_dict(backbone_state, "int8", scorer))
    stored = gate.to_dict()
    assert _plain(stored)
    buffer = io.BytesIO()
    torch.save({"meta": {"input_gate": stored}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu", weights_only=True)["meta"]["input_gate"]
    again = InputGate.from_dict(loaded)
    assert (again.method, again.threshold, again.input_size, again.scorer) == (gate.method, 0.5, 32, scorer)
    assert loaded["state_dict"].keys() == stored["state_dict"].keys()
    batch = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again.score(batch), gate.score(batch))
    if scorer == "cosine_knn":
        assert loaded["reference"].dtype == torch.float16


def test_refuses_is_strictly_above_threshold(backbone_state: dict) -> None:
    stored = tiny_gate_dict(backbone_state)
    batch = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    scores = InputGate.from_dict(stored).score(batch)
    stored["threshold"] = float(scores.sort().values[1])
    gate = InputGate.from_dict(stored)
    assert gate.refuses(batch).tolist() == (gate.score(batch) > gate.threshold).tolist()
    assert int(gate.refuses(batch).sum()) == 1


def test_bad_gate_dicts_are_rejected(backbone_state: dict) -> None:
    stored = tiny_gate_dict(backbone_state)
    with pytest.raises(ValueError, match="scorer"):
        InputGate.from_dict({**stored, "scorer": "magic"})
    with pytest.raises(ValueError, match="format"):
        InputGate.from_dict({**stored, "format": 99})
    with pytest.raises(ValueError, match="k="):
        InputGate.from_dict({**stored, "k": 41})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gate_follows_the_batch_to_cuda(backbone_state: dict) -> None:
    gate = InputGate.from_dict(tiny_gate_dict(backbone_state))
    batch = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    on_cpu = gate.score(batch)
    on_cuda = gate.score(batch.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), on_cpu, atol=1e-3)


def test_select_threshold_is_the_conformal_quantile() -> None:
    # n = 199, q = 1 %: rank ceil(200 * 0.99) = 198, so exactly one calibration score lies above.
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 200.0))
    threshold = ood.select_threshold(scores, 0.01)
    assert threshold == 198.0 and ood.refusal_rate(scores, threshold) == pytest.approx(1 / 199)
    # n = 99: rank ceil(100 * 0.99) = 99, the maximum; nothing is refused.
    assert ood.select_threshold(np.arange(99.0), 0.01) == 98.0
    with pytest.raises(ValueError):
        ood.select_threshold(np.arange(50.0), 0.01)  # too few to bound 1 %


def test_select_threshold_bounds_refusal_of_new_images() -> None:
    """Averaged over many calibration sets, new exchangeable images are refused at most q of the time."""
    rng = np.random.default_rng(1)
    rates = [ood.refusal_rate(rng.normal(size=5000), ood.select_threshold(rng.normal(size=300), 0.05))
             for _ in range(400)]
    assert float(np.mean(rates)) <= 0.05 + 0.003


def test_crossfit_keeps_lesions_on_one_side() -> None:
    # Lesion "b" has very high scores on all its images: only when it falls on the measured side
    # is anything refused, so each split's rate is either 0 or its share of that side.
    scores = np.r_[np.linspace(0, 1, 300), [10.0] * 4]
    groups = [f"l{i}" for i in range(300)] + ["b"] * 4
    result = ood.crossfit_false_refusal(scores, groups, 0.1, repeats=10)
    assert result["splits"] == 20 and result["lesions"] == 301 and result["images"] == 304
    assert 0.0 <= result["mean"] <= result["max"] <= 1.0


def test_auroc_and_hash_halves() -> None:
    assert ood.auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert ood.auroc([0.1, 0.3], [0.2, 0.4]) == 0.75
    names = [f"n{i:08d}_x.jpg" for i in range(200)]
    halves = [ood.name_hash_half(n) for n in names]
    assert halves == [ood.name_hash_half(n) for n in names] and 60 < sum(halves) < 140


def test_synthetic_images_are_deterministic_and_decodable() -> None:
    first, second = generate(2 * len(KINDS), seed=3), generate(2 * len(KINDS), seed=3)
    assert [s.data for s in first] == [s.data for s in second]
    assert [s.data for s in generate(len(KINDS), seed=4)] != [s.data for s in first[: len(KINDS)]]
    assert {s.kind for s in first} == set(KINDS)
    assert len({s.name for s in first}) == len(first)
    for image in first:
        width, height = image.size
        assert max(width, height) / min(width, height) <= MAX_ASPECT + 0.01
        decoded = decode_image(image.data)
        assert decoded.original_size == (width, height)
        assert Image.open(io.BytesIO(image.data)).format.lower() == image.format


def test_flat_synthetic_frames_include_black_white_and_grey() -> None:
    flats = [s for s in generate(5 * len(KINDS), seed=0) if s.kind == "flat"]
    colours = {Image.open(io.BytesIO(s.data)).convert("RGB").getpixel((0, 0)) for s in flats}
    assert {(0, 0, 0), (255, 255, 255)} <= colours
    assert any(r == g == b and 100 < r < 160 for r, g, b in colours)


def test_dermoscopy_split_keeps_lesions_apart() -> None:
    folder = DATA / "ham10000-200x150"
    if not (folder / "metadata.csv").exists():
        pytest.skip(f"HAM10000 4:3 data not found at {folder} (set SKIN_LESION_DATA or place ../shared/data)")
    split = ood.dermoscopy_split(folder / "metadata.csv", folder / "images", VAL_SPLIT)
    val_ids = json.loads((VAL_SPLIT).read_text())["val_image_ids"]
    assert not {i.group for i in split.train} & {i.group for i in split.val}
    assert len({i.group for i in split.val}) == len(val_ids)
    assert len(split.train) + len(split.val) == 10015
    pool = ood.one_per_lesion(split.train, 50, seed=0)
    assert len({i.group for i in pool}) == 50 and pool == ood.one_per_lesion(split.train, 50, seed=0)


def test_choose_by_refusal_then_partial_auroc_then_cost() -> None:
    def row(size: int, refusal: float, pauc: float, storage: str = "float16", references: int = 600, k: int = 1) -> dict:
        return {"size": size, "storage": storage, "references": references, "k": k, "refusal_a": refusal,
                "refusal_b": 1.0, "pauc_a": pauc, "pauc_b": 0.99}

    rows = [row(224, 1.0, 0.98), row(128, 1.0, 0.98), row(96, 0.996, 0.999), row(128, 1.0, 0.98, references=2000),
            row(160, 1.0, 0.985)]
    assert ood.choose(rows, ["a", "b"]) == rows[4]  # refusal ties at 1.0; the best partial AUROC wins
    assert ood.choose(rows[:4], ["a", "b"]) == rows[1]  # all tied: the smallest input, then fewer references
    f16, int8 = row(128, 1.0, 0.98), row(128, 0.998, 0.978, "int8")
    assert ood.choose_storage(f16, int8, ["a", "b"], tolerance=0.005) == int8
    assert ood.choose_storage(f16, row(128, 0.99, 0.98, "int8"), ["a", "b"], tolerance=0.005) == f16


def test_frozen_gate_scores_like_the_eager_one(backbone_state: dict) -> None:
    """The served gate runs as frozen TorchScript when the model does (runtime: torchscript)."""
    gate = InputGate.from_dict(tiny_gate_dict(backbone_state))
    batch = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    eager = gate.score(batch)
    frozen = gate.freeze().score(batch)
    assert gate._frozen is not None
    assert torch.allclose(frozen, eager, atol=1e-5)


def head_gate_dict(state: dict[str, torch.Tensor], head_threshold: float = 0.5) -> dict:
    """A format-2 gate: the tiny kNN gate plus a random modality head over dermoscopy, clinical, other."""
    generator = torch.Generator().manual_seed(7)
    head = {"classes": list(MODALITIES), "weight": torch.randn(3, 1280, generator=generator) * 3,
            "bias": torch.tensor([0.2, -0.1, 0.0]), "threshold": head_threshold}
    stored = tiny_gate_dict(state)
    return make_gate_dict(state, method="test-32-cosine_knn-head", input_size=32, scorer="cosine_knn", threshold=0.5,
                          k=3, reference=stored["reference"].float(), modality_head=head)


def test_modality_head_matches_an_independent_computation(backbone_state: dict) -> None:
    """p = softmax(W f/|f| + b) over the gate's pooled features; refused = distance or 1 - p(dermoscopy) above its threshold."""
    stored = head_gate_dict(backbone_state)
    gate = InputGate.from_dict(stored)
    batch = torch.randint(0, 256, (5, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    features = gate.features(batch).double()
    logits = (features / features.norm(dim=1, keepdim=True)) @ stored["modality_head"]["weight"].double().T \
        + stored["modality_head"]["bias"].double()
    expected = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    assessment = gate.assess(batch)
    assert torch.allclose(assessment.probabilities.double(), expected, atol=1e-5)
    assert torch.allclose(assessment.not_dermoscopy.double(), 1 - expected[:, 0], atol=1e-5)
    for threshold in (0.0, float(assessment.not_dermoscopy.median()), 1.0):
        stored["modality_head"]["threshold"] = threshold
        again = InputGate.from_dict(stored).assess(batch)
        assert again.refused.tolist() == ((again.score > 0.5) | (again.not_dermoscopy > threshold)).tolist()
        for i in range(len(batch)):
            if not again.refused[i]:
                assert again.reason(i) is None
            else:  # the more probable of the head's two non-dermoscopy classes
                assert again.reason(i) == ("clinical" if expected[i, 1] >= expected[i, 2] else "other")
            assert again.modality(i) == MODALITIES[int(expected[i].argmax())]
    assert torch.equal(InputGate.from_dict(stored).refuses(batch), again.refused)


def test_format_2_gate_round_trips_weights_only_and_format_1_still_loads(backbone_state: dict) -> None:
    stored = head_gate_dict(backbone_state)
    assert stored["format"] == 2 and GATE_FORMAT == 3 and _plain(stored)  # no network spec: readable by 1.6.x
    buffer = io.BytesIO()
    torch.save({"meta": {"input_gate": stored}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu", weights_only=True)["meta"]["input_gate"]
    batch = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    first, again = InputGate.from_dict(stored).assess(batch), InputGate.from_dict(loaded).assess(batch)
    assert torch.equal(first.probabilities, again.probabilities) and torch.equal(first.refused, again.refused)
    # A gate stored by release 1.6.0 (format 1, distance only) is served as it was: no head, reason "other".
    old = {key: value for key, value in tiny_gate_dict(backbone_state).items() if key != "modality_head"}
    old["format"] = 1
    old_gate = InputGate.from_dict(old)
    assessment = old_gate.assess(batch)
    assert old_gate.head is None and assessment.probabilities is None and assessment.not_dermoscopy is None
    assert assessment.refused.tolist() == (assessment.score > 0.5).tolist()
    assert all(assessment.reason(i) in (None, "other") for i in range(2))


def test_gate_takes_any_model_input_shape(backbone_state: dict) -> None:
    """A rectangular model input (e.g. 150x200, release 1.7.0) is resized to the gate's square input like a square one."""
    gate = InputGate.from_dict(head_gate_dict(backbone_state))
    wide = torch.randint(0, 256, (2, 3, 150, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(10))
    x = F.interpolate(wide.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    square = x.round().clamp(0, 255).to(torch.uint8)
    assert gate.assess(wide).score.shape == (2,)
    assert torch.allclose(gate.assess(wide).score, gate.assess(square).score, atol=0.05)
    frozen = InputGate.from_dict(head_gate_dict(backbone_state)).freeze()
    assert torch.allclose(frozen.assess(wide).probabilities, gate.assess(wide).probabilities, atol=1e-4)


def test_bad_modality_heads_are_refused(backbone_state: dict) -> None:
    stored = head_gate_dict(backbone_state)
    with pytest.raises(ValueError, match="dermoscopy"):
        InputGate.from_dict({**stored, "modality_head": {**stored["modality_head"], "classes": ["clinical", "other", "x"]}})
    with pytest.raises(ValueError, match="do not match"):
        InputGate.from_dict({**stored, "modality_head": {**stored["modality_head"], "bias": torch.zeros(2)}})
    with pytest.raises(ValueError, match="refit"):
        InputGate.from_dict({**stored, "format": 4})


def test_group_folds_keep_patients_together_and_wilson_interval() -> None:
    groups = [f"p{i // 3}" if i < 60 else f"q{i}" for i in range(100)]
    folds = ood.group_folds(groups, 5, seed=0)
    for group in set(groups):
        assert len({int(f) for f, g in zip(folds, groups) if g == group}) == 1
    assert sorted(np.bincount(folds).tolist()) == [20] * 5
    low, high = ood.wilson_interval(0, 70)
    assert low == 0.0 and high == pytest.approx(0.0520, abs=2e-4)  # 0 of 70: the rule-of-three region
    low, high = ood.wilson_interval(90, 100)
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)


def test_union_thresholds_bound_the_union_refusal() -> None:
    rng = np.random.default_rng(2)
    columns = [rng.normal(size=2000), rng.normal(size=2000)]
    thresholds = ood.union_thresholds(columns, [0.002, 0.008])
    refused = ood.union_refused(columns, thresholds)
    assert refused.mean() <= 0.01 and (columns[0] > thresholds[0]).sum() <= 4
    result = ood.crossfit_union_false_refusal(columns, [str(i) for i in range(2000)], [0.002, 0.008], repeats=5)
    assert 0.003 < result["mean"] < 0.02 and result["interval95"][0] < result["mean"] < result["interval95"][1]


TRUNCATED = {"blocks": 5, "parts": ["mean3", "std3", "mean4", "std4", "colour"]}


def truncated_gate_dict(full_state: dict[str, torch.Tensor]) -> dict:
    """A format-3 gate: the first 5 stages, pooled parts, the distance on mean4, a head on every part."""
    generator = torch.Generator().manual_seed(11)
    width = 80 + 80 + 112 + 112 + 13
    head = {"classes": list(MODALITIES), "weight": torch.randn(3, width, generator=generator), "bias": torch.randn(3, generator=generator),
            "threshold": 0.6, "parts": TRUNCATED["parts"], "colour_mean": torch.rand(13, generator=generator),
            "colour_std": torch.rand(13, generator=generator) + 0.5}
    return make_gate_dict(ood.network_state(full_state, TRUNCATED), method="test-48-stages5", input_size=48,
                          scorer="cosine_knn", threshold=0.5, k=2, reference=torch.randn(12, 112, generator=generator),
                          modality_head=head, network=TRUNCATED, distance_parts=["mean4"])


def test_format_3_truncated_gate_matches_an_independent_computation(backbone_state: dict) -> None:
    """Format 3: only the stages that run are stored; the distance reads stage 4's mean, the head every part
    (unit-normalized, colour standardized); weights-only round trip; frozen as eager."""
    stored = truncated_gate_dict(backbone_state)
    assert stored["format"] == 3 and _plain(stored)
    assert not any(key.startswith(("blocks.5", "blocks.6", "conv_head")) for key in unpack_state_dict(stored["state_dict"]))
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    buffer.seek(0)
    gate = InputGate.from_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    batch = torch.randint(0, 256, (3, 3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))
    # Independently: the full network's stages, hooked, on the same input.
    network = build_gate_backbone().eval()
    network.load_state_dict({**backbone_state, **unpack_state_dict(stored["state_dict"])})
    x = gate_input(batch, 48, gate.mean, gate.std)
    with torch.no_grad():
        h = network.bn1(network.conv_stem(x))
        outputs = []
        for block in network.blocks[:5]:
            h = block(h)
            outputs.append(h)
    x01 = x * 0.5 + 0.5
    corners = torch.stack([x01[:, :, :8, :8].mean((1, 2, 3)), x01[:, :, :8, -8:].mean((1, 2, 3)),
                           x01[:, :, -8:, :8].mean((1, 2, 3)), x01[:, :, -8:, -8:].mean((1, 2, 3))], 1)
    centre = x01[:, :, 12:36, 12:36].mean((1, 2, 3))[:, None]
    colour = torch.cat([x01.mean((2, 3)), x01.flatten(2).std(2), corners, corners.min(1, keepdim=True).values, centre,
                        centre - corners.mean(1, keepdim=True)], 1)
    parts = [outputs[3].mean((2, 3)), outputs[3].flatten(2).std(2), outputs[4].mean((2, 3)), outputs[4].flatten(2).std(2)]
    features = gate.features(batch)
    assert torch.allclose(features, torch.cat([*parts, colour], 1), atol=1e-4)
    reference = F.normalize(stored["reference"].float(), dim=1)
    expected_score = 1 - (F.normalize(parts[2], dim=1) @ reference.T).topk(2, dim=1).values.mean(1)
    head = stored["modality_head"]
    inputs = torch.cat([F.normalize(p, dim=1) for p in parts] + [(colour - head["colour_mean"]) / head["colour_std"]], 1)
    expected = (inputs @ head["weight"].T + head["bias"]).softmax(1)
    assessment = gate.assess(batch)
    assert torch.allclose(assessment.score, expected_score, atol=1e-4)
    assert torch.allclose(assessment.probabilities, expected, atol=1e-4)
    assert assessment.refused.tolist() == ((expected_score > 0.5) | (1 - expected[:, 0] > 0.6)).tolist()
    frozen = InputGate.from_dict(stored).freeze().assess(batch)
    assert torch.allclose(frozen.probabilities, assessment.probabilities, atol=1e-5)


def test_format_3_parts_must_be_computed(backbone_state: dict) -> None:
    stored = truncated_gate_dict(backbone_state)
    with pytest.raises(ValueError, match="not computed"):
        InputGate.from_dict({**stored, "distance_parts": ["mean5"]})
    with pytest.raises(ValueError, match="stages"):
        InputGate.from_dict({**stored, "network": {"blocks": 4, "parts": TRUNCATED["parts"]}})
