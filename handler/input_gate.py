"""The out-of-distribution gate: refuse requests that are not dermoscopic photos of a skin lesion.

The classifier answers every image with a lesion class, often confidently: a document,
a landscape or a flat grey frame gets "melanocytic nevus, 0.9". Its own features are a
poor judge of that, because fine-tuning on dermoscopy taught them to ignore what is not a
lesion (measured: AUROC 0.60-0.82 against everyday photos). A generic ImageNet network,
before any fine-tuning, still describes photos, documents and textures in general, so
dermoscopy forms a tight cluster in its pooled features and anything else lands far from
it. The gate is therefore a separate, small ImageNet EfficientNet-Lite0, run at a reduced
input size on the *same* ``uint8`` model input the classifier receives (one decode per
request), followed by a distance to dermoscopic reference features.

Everything the gate needs is one plain dict (:meth:`InputGate.to_dict`) of tensors and
plain types that loads with ``torch.load(weights_only=True)``, stored in the release
checkpoint as ``meta["input_gate"]``:

``format``
    :data:`GATE_FORMAT`.
``method``
    A short human-readable name, e.g. ``imagenet-lite0-128-cosine-knn10``.
``arch``, ``storage``, ``state_dict``
    The timm architecture of the backbone (pooled features, no classifier) and its weights
    as :func:`handler.storage.pack_state_dict` stored them.
``input_size``, ``mean``, ``std``
    The gate's square input side, and the normalization (0..1 scale) of its ImageNet weights.
``scorer`` and its tensors
    ``cosine_knn``: ``reference`` (M, D) unit-length reference features (float16) and ``k``;
    the score is one minus the mean cosine similarity to the ``k`` nearest references.
    ``mahalanobis``: ``means`` (C, D) class means and ``whitening`` (D, D) with
    ``whitening @ whitening.T`` the shared precision matrix; the score is the squared
    Mahalanobis distance to the nearest class mean.
``threshold``
    Scores strictly above it are refused. Set from validation dermoscopy (``lab/ood.py``).
``modality_head`` (format 2; absent or None in format 1)
    A linear classifier over the *same* pooled features, unit-normalized: ``classes``
    (:data:`MODALITIES`, e.g. ``["dermoscopy", "clinical", "other"]``), ``weight`` (C, D) and
    ``bias`` (C,) float32, and ``threshold``: an image whose ``1 - p(dermoscopy)`` is strictly
    above it is refused too. The distance alone cannot tell a smartphone photo of a lesion
    from dermoscopy (it accepted ~88 % of them); the head was fitted to, on patient-grouped
    splits of clinical photos. A refused image's *reason* is the more probable of the head's
    non-dermoscopy classes (``clinical`` or ``other``), ``other`` without a head.
``network`` (format 3; absent in formats 1 and 2)
    What the gate network computes (:class:`GateNetwork`): ``blocks``, how many of the backbone's
    stages run (the later, costlier ones are left out: the stored ``state_dict`` holds only the
    stages that run), and ``parts``, the pooled features concatenated into the gate's feature
    vector, in order: ``mean<i>`` / ``std<i>`` (spatial mean / standard deviation of stage ``i``'s
    output), ``final`` (the full network's pooled features, formats 1 and 2) and ``colour``
    (:func:`colour_statistics` of the gate input). ``distance_parts`` names the parts the distance
    compares (each unit-normalized, concatenated, unit-normalized again); the modality head's
    ``parts`` the ones it reads (each unit-normalized, ``colour`` standardized by the head's
    ``colour_mean`` / ``colour_std``). Formats 1 and 2 are ``final`` for all three.
``provenance``
    Plain-types description of how the gate was fitted.

The fitting and its measurements live in ``lab/gate_fitting.py`` and ``lab/ood.py`` (``make fit-gate``);
this module only needs the stored dict, torch and timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from handler.storage import check_storage_dtype, pack_state_dict, unpack_state_dict

GATE_FORMAT = 3
# Formats this module reads: 1 (distance only), 2 (distance and an optional modality head, both on the
# full network's pooled features) and 3 (a truncated network, several pooled parts: ``network``).
READABLE_GATE_FORMATS = (1, 2, 3)
FINAL, COLOUR = "final", "colour"
# Formats 1 and 2: the full network's pooled features, for the distance and the head alike.
FULL_NETWORK: dict[str, Any] = {"blocks": None, "parts": [FINAL]}
COLOUR_FEATURES = 13  # see colour_statistics
DERMOSCOPY, CLINICAL, OTHER = "dermoscopy", "clinical", "other"
MODALITIES: tuple[str, ...] = (DERMOSCOPY, CLINICAL, OTHER)
GATE_ARCH = "tf_efficientnet_lite0"
SCORERS: tuple[str, ...] = ("cosine_knn", "mahalanobis")
# The normalization EfficientNet-Lite's ImageNet weights were trained with (0..1 scale).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


def build_gate_backbone(arch: str = GATE_ARCH) -> nn.Module:
    """The untrained gate network: timm ``arch`` with no classifier, returning pooled features.

    ``num_classes=0`` makes timm's forward end at global average pooling, so the output is
    the (N, 1280) feature vector the scorers compare; no head weights are stored.
    """
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0)


def gate_input(batch: torch.Tensor, input_size: int, mean: tuple[float, ...] | list[float],
               std: tuple[float, ...] | list[float]) -> torch.Tensor:
    """The gate's normalized float input from the classifier's ``uint8`` NCHW batch.

    The batch is downsampled with an antialiased bilinear filter (the area average matters:
    a plain bilinear resize of 224 to 128 px aliases fine texture) and normalized, on the
    batch's device.

    Args:
        batch: ``uint8`` tensor (N, 3, H, W), e.g. from :func:`handler.preprocessing.load_model_input`.
        input_size: Side of the square gate input.
        mean: Per-channel mean on the 0..1 scale.
        std: Per-channel standard deviation on the 0..1 scale.

    Returns:
        ``float32`` (N, 3, input_size, input_size), channels-last.
    """
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
    x = batch.float()
    if tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor([float(m) * 255.0 for m in mean], device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor([float(s) * 255.0 for s in std], device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def colour_statistics(inputs: torch.Tensor, mean: tuple[float, ...] | list[float],
                      std: tuple[float, ...] | list[float]) -> torch.Tensor:
    """(N, 13) colour and field statistics of a normalized gate input, on the 0..1 scale.

    Per-channel mean (3) and standard deviation (3); the mean brightness of the four corners
    (a sixth of the height and width each) and of the darkest one; of the central half; and the
    centre minus the mean corner. A dermatoscope's contact plate often leaves a dark circular
    field with dark corners and lights the lesion evenly; a phone photo shows lit skin to its edges.
    """
    x = inputs.float() * torch.tensor([float(s) for s in std], device=inputs.device).view(1, 3, 1, 1) \
        + torch.tensor([float(m) for m in mean], device=inputs.device).view(1, 3, 1, 1)
    height, width = x.shape[-2:]
    ch, cw = max(1, height // 6), max(1, width // 6)
    corners = torch.stack([x[:, :, :ch, :cw].mean((1, 2, 3)), x[:, :, :ch, -cw:].mean((1, 2, 3)),
                           x[:, :, -ch:, :cw].mean((1, 2, 3)), x[:, :, -ch:, -cw:].mean((1, 2, 3))], 1)
    centre = x[:, :, height // 4:3 * height // 4, width // 4:3 * width // 4].mean((1, 2, 3))[:, None]
    return torch.cat([x.mean((2, 3)), x.flatten(2).std(2), corners, corners.min(1, keepdim=True).values, centre,
                      centre - corners.mean(1, keepdim=True)], 1)


def part_width(backbone: nn.Module, part: str) -> int:
    """Width of one pooled part of :class:`GateNetwork`'s output."""
    if part == FINAL:
        return int(backbone.num_features)
    if part == COLOUR:
        return COLOUR_FEATURES
    kind, stage = part[:-1], int(part[-1])
    if kind not in ("mean", "std") or not 0 <= stage < len(backbone.blocks):
        raise ValueError(f"unknown gate feature part {part!r}: mean<i>, std<i>, {FINAL} or {COLOUR}")
    last = backbone.blocks[stage][-1]
    conv = getattr(last, "conv_pwl", None) or getattr(last, "conv_pw", None) or getattr(last, "conv")
    return int(conv.out_channels)


class GateNetwork(nn.Module):
    """The gate's network: the backbone's first ``blocks`` stages, and pooled ``parts`` concatenated.

    Its ``state_dict`` holds only what runs (stem, the first ``blocks`` stages, and the head
    convolution when ``final`` is a part), under the backbone's own key names.
    """

    def __init__(self, backbone: nn.Module, blocks: int | None, parts: list[str] | tuple[str, ...],
                 mean: tuple[float, ...] | list[float] = LITE_MEAN, std: tuple[float, ...] | list[float] = LITE_STD) -> None:
        super().__init__()
        self.parts = tuple(str(p) for p in parts)
        self.widths = tuple(part_width(backbone, p) for p in self.parts)
        count = len(backbone.blocks) if blocks is None or FINAL in self.parts else int(blocks)
        needed = [int(p[-1]) for p in self.parts if p not in (FINAL, COLOUR)]
        if needed and max(needed) >= count:
            raise ValueError(f"parts {list(self.parts)} need more than the {count} stages that run")
        self.conv_stem, self.bn1 = backbone.conv_stem, backbone.bn1
        self.blocks = nn.Sequential(*list(backbone.blocks)[:count])
        if FINAL in self.parts:
            self.conv_head, self.bn2 = backbone.conv_head, backbone.bn2
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    @property
    def width(self) -> int:
        return sum(self.widths)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        pooled: dict[str, torch.Tensor] = {}
        x = self.bn1(self.conv_stem(inputs))
        for index, block in enumerate(self.blocks):
            x = block(x)
            if f"mean{index}" in self.parts:
                pooled[f"mean{index}"] = x.mean((2, 3))
            if f"std{index}" in self.parts:
                pooled[f"std{index}"] = x.flatten(2).std(2)
        if FINAL in self.parts:
            pooled[FINAL] = self.bn2(self.conv_head(x)).mean((2, 3))
        if COLOUR in self.parts:
            pooled[COLOUR] = colour_statistics(inputs, self.mean, self.std)
        return torch.cat([pooled[p].float() for p in self.parts], 1)


def build_gate_network(spec: Mapping[str, Any], arch: str = GATE_ARCH,
                       backbone_state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The untrained gate network a stored ``network`` spec describes (:data:`FULL_NETWORK`: the plain
    backbone of formats 1 and 2, returning its pooled features); ``backbone_state``, the full
    backbone's weights, is loaded first when given (fitting: the stored state is the network's)."""
    backbone = build_gate_backbone(arch)
    if backbone_state is not None:
        backbone.load_state_dict(dict(backbone_state))
    if spec.get("blocks") is None and list(spec["parts"]) == [FINAL]:
        return backbone
    return GateNetwork(backbone, spec.get("blocks"), spec["parts"])


def part_slices(parts: list[str] | tuple[str, ...], widths: list[int] | tuple[int, ...]) -> dict[str, slice]:
    """Where each part lies in the concatenated feature vector."""
    out, start = {}, 0
    for part, width in zip(parts, widths):
        out[part] = slice(start, start + width)
        start += width
    return out


def distance_input(features: torch.Tensor, slices: Mapping[str, slice], parts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """The vector the distance compares: each part unit-normalized, concatenated (the scorers normalize again)."""
    if len(parts) == 1:
        return features[:, slices[parts[0]]].float()
    return torch.cat([F.normalize(features[:, slices[p]].float(), dim=1) for p in parts], 1)


def head_input(features: torch.Tensor, slices: Mapping[str, slice], parts: list[str] | tuple[str, ...],
               colour_mean: torch.Tensor | None = None, colour_std: torch.Tensor | None = None) -> torch.Tensor:
    """The vector the modality head reads: each part unit-normalized, ``colour`` standardized."""
    columns = []
    for part in parts:
        x = features[:, slices[part]].float()
        if part == COLOUR:
            if colour_mean is None or colour_std is None:
                raise ValueError("a head reading colour statistics needs colour_mean and colour_std")
            columns.append((x - colour_mean.to(x.device)) / colour_std.to(x.device))
        else:
            columns.append(F.normalize(x, dim=1))
    return torch.cat(columns, 1)


def head_probabilities(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, C) softmax probabilities of the linear modality head over :func:`head_input` vectors."""
    logits = inputs.float() @ weight.to(device=inputs.device, dtype=torch.float32).T \
        + bias.to(device=inputs.device, dtype=torch.float32)
    return logits.softmax(dim=1)


def cosine_knn_scores(features: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """One minus the mean cosine similarity of each feature vector to its ``k`` nearest references.

    Args:
        features: (N, D) features.
        reference: (M, D) reference features, rows of unit length.
        k: Neighbours averaged, ``1 <= k <= M``.

    Returns:
        (N,) float32 scores in [0, 2]; higher is further from the references.
    """
    unit = F.normalize(features.float(), dim=1)
    similarity = unit @ reference.to(device=unit.device, dtype=torch.float32).T
    return 1.0 - similarity.topk(k, dim=1).values.mean(dim=1)


def mahalanobis_scores(features: torch.Tensor, means: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance to the nearest class mean, with one shared covariance.

    Args:
        features: (N, D) features.
        means: (C, D) class means.
        whitening: (D, D) matrix ``W`` with ``W @ W.T`` the shared precision matrix.

    Returns:
        (N,) float32 scores; higher is further from every class.
    """
    whitening = whitening.to(device=features.device, dtype=torch.float32)
    z = features.float() @ whitening
    centres = means.to(device=features.device, dtype=torch.float32) @ whitening
    return torch.cdist(z, centres).pow(2).min(dim=1).values


def modality_probabilities(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, C) softmax probabilities of the linear modality head over unit-normalized features.

    Args:
        features: (N, D) pooled gate features.
        weight: (C, D) head weights.
        bias: (C,) head biases.
    """
    unit = F.normalize(features.float(), dim=1)
    logits = unit @ weight.to(device=unit.device, dtype=torch.float32).T + bias.to(device=unit.device, dtype=torch.float32)
    return logits.softmax(dim=1)


@dataclass(frozen=True)
class GateAssessment:
    """The gate's verdict on a batch (tensors on the batch's device; see :meth:`InputGate.assess`).

    Attributes:
        score: (N,) distance scores (higher = further from dermoscopy).
        refused: (N,) booleans: the distance or the modality head refuses the image.
        probabilities: (N, C) modality-head probabilities over ``classes``, or None without a head.
        classes: The head's classes (empty without a head).
    """

    score: torch.Tensor
    refused: torch.Tensor
    probabilities: torch.Tensor | None = None
    classes: tuple[str, ...] = ()

    @property
    def not_dermoscopy(self) -> torch.Tensor | None:
        """(N,) ``1 - p(dermoscopy)`` of the head, or None without a head."""
        if self.probabilities is None:
            return None
        return 1.0 - self.probabilities[:, self.classes.index(DERMOSCOPY)]

    def modality(self, index: int) -> str:
        """The head's most probable modality for image ``index`` (``dermoscopy`` or ``other`` without a
        head, from the distance alone)."""
        if self.probabilities is None:
            return OTHER if bool(self.refused[index]) else DERMOSCOPY
        return self.classes[int(self.probabilities[index].argmax())]

    def reason(self, index: int) -> str | None:
        """Why image ``index`` is refused: ``clinical`` or ``other``; None when it is accepted.

        The more probable of the head's non-dermoscopy classes, so that an image the distance
        refuses while the head still calls it dermoscopy-like is ``other``.
        """
        if not bool(self.refused[index]):
            return None
        if self.probabilities is None or CLINICAL not in self.classes:
            return OTHER
        row = self.probabilities[index]
        others = [c for c in self.classes if c != DERMOSCOPY]
        return max(others, key=lambda c: float(row[self.classes.index(c)]))


class InputGate:
    """A fitted out-of-distribution gate (see the module docstring for the stored dict).

    Build it with :meth:`from_dict`; :meth:`score` a ``uint8`` batch; :meth:`refuses` says
    which images to turn away. The gate follows the device of the batch it is given.

    Attributes:
        method: Short name of the method, e.g. ``imagenet-lite0-128-cosine-knn10``.
        threshold: Scores strictly above it are refused.
        input_size: Side of the square gate input.
        scorer: One of :data:`SCORERS`.
    """

    def __init__(self, stored: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        self._stored = dict(stored)
        if stored.get("format") not in READABLE_GATE_FORMATS:
            raise ValueError(f"input gate format {stored.get('format')!r} is not one this handler reads "
                             f"({list(READABLE_GATE_FORMATS)}); refit the gate with scripts/fit_input_gate.py")
        self.scorer = str(stored["scorer"])
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown input gate scorer {self.scorer!r}; known: {list(SCORERS)}")
        check_storage_dtype(str(stored["storage"]))
        self.method = str(stored["method"])
        self.threshold = float(stored["threshold"])
        self.input_size = int(stored["input_size"])
        self.mean = tuple(float(v) for v in stored["mean"])
        self.std = tuple(float(v) for v in stored["std"])
        self.k = int(stored.get("k", 0))
        if self.scorer == "cosine_knn" and not 1 <= self.k <= stored["reference"].shape[0]:
            raise ValueError(f"k={self.k} needs 1..{stored['reference'].shape[0]} references")
        head = stored.get("modality_head")
        self.head: dict[str, Any] | None = None
        if head is not None:
            classes = tuple(str(c) for c in head["classes"])
            if DERMOSCOPY not in classes or not set(classes) <= set(MODALITIES):
                raise ValueError(f"modality head classes {list(classes)} must include {DERMOSCOPY!r} and be among "
                                 f"{list(MODALITIES)}")
            if tuple(head["weight"].shape) != (len(classes), head["weight"].shape[1]) or head["bias"].shape != (len(classes),):
                raise ValueError(f"modality head weight {tuple(head['weight'].shape)} / bias {tuple(head['bias'].shape)} "
                                 f"do not match {len(classes)} classes")
            self.head = {"classes": classes, "threshold": float(head["threshold"]),
                         "parts": tuple(str(p) for p in head.get("parts", (FINAL,)))}
        self.network_spec = dict(stored.get("network") or FULL_NETWORK)
        self.backbone = build_gate_network(self.network_spec, str(stored["arch"]))
        self.backbone.load_state_dict(unpack_state_dict(stored["state_dict"]))
        self.backbone.eval().requires_grad_(False)
        if isinstance(self.backbone, GateNetwork):
            parts, widths = self.backbone.parts, self.backbone.widths
        else:
            parts, widths = (FINAL,), (int(self.backbone.num_features),)
        self.slices = part_slices(parts, widths)
        self.distance_parts = tuple(str(p) for p in stored.get("distance_parts", (FINAL,)))
        for part in (*self.distance_parts, *(self.head["parts"] if self.head else ())):
            if part not in self.slices:
                raise ValueError(f"gate part {part!r} is not computed by its network (parts {list(parts)})")
        self.device = torch.device("cpu")
        self._tensors: dict[str, torch.Tensor] = {}
        self._frozen: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.to(device)

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], device: torch.device | str = "cpu") -> "InputGate":
        """The gate a :meth:`to_dict` dict describes (e.g. ``checkpoint["meta"]["input_gate"]``)."""
        return cls(stored, device)

    def to_dict(self) -> dict[str, Any]:
        """The stored dict, unchanged (weights stay as packed: no second rounding)."""
        return dict(self._stored)

    def to(self, device: torch.device | str) -> "InputGate":
        """Move the backbone and the reference tensors to ``device``; returns ``self``."""
        self._frozen = None
        self.backbone.to(torch.device(device)).to(memory_format=torch.channels_last)
        # The parameters' device names the index ("cuda" becomes "cuda:0"), so that it compares
        # equal to a batch's device and features() does not move the gate again on every call.
        device = next(self.backbone.parameters()).device
        if self.scorer == "cosine_knn":
            # Renormalized after the float16 round trip, so that the score is an exact cosine.
            self._tensors = {"reference": F.normalize(self._stored["reference"].to(device=device, dtype=torch.float32), dim=1)}
        else:
            self._tensors = {name: self._stored[name].to(device=device, dtype=torch.float32) for name in ("means", "whitening")}
        if self.head is not None:
            head = self._stored["modality_head"]
            self._tensors.update(head_weight=head["weight"].to(device=device, dtype=torch.float32),
                                 head_bias=head["bias"].to(device=device, dtype=torch.float32))
            if COLOUR in self.head["parts"]:
                self._tensors.update(colour_mean=head["colour_mean"].to(device=device, dtype=torch.float32),
                                     colour_std=head["colour_std"].to(device=device, dtype=torch.float32))
        self.device = device
        return self

    def freeze(self, runtime: str = "torchscript", threads: int = 0) -> "InputGate":
        """Run the backbone compiled like the served model: a traced, frozen TorchScript graph
        (``runtime: torchscript``; about 1.7x faster than eager on this CPU, the same features to
        ~1e-5) or OpenVINO (``runtime: openvino``, ``threads`` inference threads, 0 = all cores).
        Call after :meth:`to`; moving the gate afterwards goes back to eager."""
        import warnings

        example = torch.zeros(2, 3, self.input_size, self.input_size, device=self.device)
        if runtime == "openvino":
            from handler.openvino_runtime import compile_for_cpu

            compiled = compile_for_cpu(self.backbone, example, threads)
            self._frozen = lambda inputs: compiled(inputs)[0]
            return self
        if runtime != "torchscript":
            raise ValueError(f"the gate compiles for torchscript or openvino, not {runtime!r}")
        example = example.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # "same" padding is traced as constants, right because every gate input has one size.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            self._frozen = torch.jit.freeze(torch.jit.trace(self.backbone, example))
            for _ in range(2):  # the profiling executor specializes on the first calls
                self._frozen(example)
        return self

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled ImageNet features of a ``uint8`` (N, 3, H, W) batch (every part, concatenated)."""
        if batch.device != self.device:
            self.to(batch.device)
        network = self._frozen if self._frozen is not None else self.backbone
        with torch.inference_mode():
            inputs = gate_input(batch, self.input_size, self.mean, self.std).contiguous(memory_format=torch.channels_last)
            return network(inputs).float()

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) scores of :meth:`features` output; higher is more out of distribution."""
        with torch.inference_mode():
            compared = distance_input(features, self.slices, self.distance_parts)
            if self.scorer == "cosine_knn":
                return cosine_knn_scores(compared, self._tensors["reference"], self.k)
            return mahalanobis_scores(compared, self._tensors["means"], self._tensors["whitening"])

    def head_features(self, features: torch.Tensor) -> torch.Tensor:
        """The modality head's input (:func:`head_input`) for :meth:`features` output."""
        if self.head is None:
            raise ValueError("this gate has no modality head")
        return head_input(features, self.slices, self.head["parts"], self._tensors.get("colour_mean"),
                          self._tensors.get("colour_std"))

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        """(N,) out-of-distribution scores of a ``uint8`` batch, on the batch's device."""
        return self.score_features(self.features(batch))

    def assess_features(self, features: torch.Tensor) -> GateAssessment:
        """The verdict on :meth:`features` output: distance scores, head probabilities, refusals."""
        score = self.score_features(features)
        refused = score > self.threshold
        if self.head is None:
            return GateAssessment(score, refused)
        with torch.inference_mode():
            probabilities = head_probabilities(self.head_features(features), self._tensors["head_weight"],
                                               self._tensors["head_bias"])
        assessment = GateAssessment(score, refused, probabilities, self.head["classes"])
        refused = refused | (assessment.not_dermoscopy > self.head["threshold"])
        return GateAssessment(score, refused, probabilities, self.head["classes"])

    def assess(self, batch: torch.Tensor) -> GateAssessment:
        """The verdict on a ``uint8`` (N, 3, H, W) batch of any model-input shape (one backbone pass)."""
        return self.assess_features(self.features(batch))

    @property
    def head_threshold(self) -> float | None:
        """The modality head's threshold on ``1 - p(dermoscopy)``, or None without a head."""
        return None if self.head is None else self.head["threshold"]

    def refuses(self, batch: torch.Tensor) -> torch.Tensor:
        """(N,) booleans: which images of a ``uint8`` batch the gate refuses (distance above
        :attr:`threshold`, or the modality head's ``1 - p(dermoscopy)`` above its threshold)."""
        return self.assess(batch).refused

    def __repr__(self) -> str:
        return f"InputGate(method={self.method!r}, threshold={self.threshold:.6g}, device={self.device})"


def make_gate_dict(backbone_state: Mapping[str, torch.Tensor], *, method: str, input_size: int, scorer: str,
                   threshold: float, storage: str = "float16", arch: str = GATE_ARCH,
                   mean: tuple[float, ...] = LITE_MEAN, std: tuple[float, ...] = LITE_STD, k: int = 0,
                   reference: torch.Tensor | None = None, means: torch.Tensor | None = None,
                   whitening: torch.Tensor | None = None, modality_head: Mapping[str, Any] | None = None,
                   provenance: Mapping[str, Any] | None = None, network: Mapping[str, Any] | None = None,
                   distance_parts: list[str] | tuple[str, ...] = (FINAL,)) -> dict[str, Any]:
    """Assemble the stored gate dict (plain types and tensors only).

    Args:
        backbone_state: The float32 state dict of :func:`build_gate_backbone`'s network;
            packed here with ``storage``.
        reference: For ``cosine_knn``: (M, D) features; normalized to unit rows and stored as float16.
        means, whitening: For ``mahalanobis``: stored as float32 (precision matters there).
        modality_head: ``{"classes", "weight", "bias", "threshold"}`` and, for format 3, ``parts`` (and
            ``colour_mean``, ``colour_std`` with ``colour``) (module docstring), or None.
        network: The ``network`` spec (format 3; :data:`FULL_NETWORK` when None); ``backbone_state``
            is then that network's state dict (:class:`GateNetwork`).
        distance_parts: The parts the distance compares.
        Others: See the module docstring.
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {list(SCORERS)}")
    gate: dict[str, Any] = {
        "format": GATE_FORMAT if network is not None else 2, "method": str(method), "arch": str(arch), "storage": check_storage_dtype(storage),
        "state_dict": pack_state_dict({name: t.detach().cpu() for name, t in backbone_state.items()}, storage),
        "input_size": int(input_size), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "scorer": scorer, "k": int(k), "threshold": float(threshold), "provenance": dict(provenance or {}),
    }
    if network is not None:
        gate["network"] = {"blocks": None if network.get("blocks") is None else int(network["blocks"]),
                           "parts": [str(p) for p in network["parts"]]}
        gate["distance_parts"] = [str(p) for p in distance_parts]
    if scorer == "cosine_knn":
        if reference is None:
            raise ValueError("cosine_knn needs reference features")
        gate["reference"] = F.normalize(reference.detach().float().cpu(), dim=1).to(torch.float16)
    else:
        if means is None or whitening is None:
            raise ValueError("mahalanobis needs means and whitening")
        gate["means"] = means.detach().float().cpu()
        gate["whitening"] = whitening.detach().float().cpu()
    if modality_head is not None:
        gate["modality_head"] = {"classes": [str(c) for c in modality_head["classes"]],
                                 "weight": torch.as_tensor(modality_head["weight"]).detach().float().cpu(),
                                 "bias": torch.as_tensor(modality_head["bias"]).detach().float().cpu(),
                                 "threshold": float(modality_head["threshold"])}
        if "parts" in modality_head:
            gate["modality_head"]["parts"] = [str(p) for p in modality_head["parts"]]
        for name in ("colour_mean", "colour_std"):
            if name in modality_head:
                gate["modality_head"][name] = torch.as_tensor(modality_head[name]).detach().float().cpu()
    return gate
