"""Function matching (lab.function_matching): the teacher sees the student's mixed view in its own geometry."""

import pytest
import torch
from torch import nn

from handler.preprocessing import FULL_VIEW, PreprocessConfig
from lab.distillation import DistillationLoss, pack_targets
from lab.function_matching import TEACHER_FROM, FunctionMatchingLoss, MixedTeacherTargets, teacher_inputs
from lab.training import seed_epoch

STUDENT = PreprocessConfig(image_size=12, resize_size=12, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=FULL_VIEW,
                           image_width=16)
TEACHER = PreprocessConfig(image_size=8, resize_size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           resize_mode=FULL_VIEW)


class RecordingTeacher(nn.Module):
    """A tiny network that remembers what it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
        self.seen: list[torch.Tensor] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen.append(inputs.clone())
        return self.net(inputs)


def test_teacher_inputs_are_the_same_pixels_in_the_teachers_size_and_normalization():
    pixels = torch.rand(2, 3, 12, 16)
    student = (pixels - 0.5) / 0.5
    shown = teacher_inputs(student, STUDENT, TEACHER)
    assert shown.shape == (2, 3, 8, 8)
    expected = nn.functional.interpolate(pixels, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(TEACHER.mean).view(1, 3, 1, 1), torch.tensor(TEACHER.std).view(1, 3, 1, 1)
    assert torch.allclose(shown, (expected - mean) / std, atol=1e-5)
    # A uniform image stays that colour through the resize, in the teacher's normalization.
    grey = teacher_inputs(torch.zeros(1, 3, 12, 16), STUDENT, TEACHER)
    assert torch.allclose(grey, (0.5 - mean) / std * torch.ones(1, 3, 8, 8), atol=1e-6)


def test_the_teacher_answers_the_mixed_view_the_student_trains_on():
    torch.manual_seed(0)
    teacher = RecordingTeacher()
    hook = MixedTeacherTargets(teacher, STUDENT, TEACHER, mixup=1.0)
    inputs, labels = torch.randn(6, 3, 12, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    seed_epoch(3, 0)
    mixed, targets = hook(inputs, labels)
    assert mixed.shape == inputs.shape and targets.shape == (6, TEACHER_FROM + 7)
    weights, first, second = targets[:, 2], targets[:, 0].long(), targets[:, 1].long()
    assert torch.equal(first, labels) and ((weights > 0) & (weights < 1)).all() and not torch.equal(second, labels)
    # Each mixed image is its weight of its own image plus the rest of its partner's (by label here).
    rebuilt = weights.view(-1, 1, 1, 1) * inputs + (1 - weights.view(-1, 1, 1, 1)) * inputs[second]
    assert torch.allclose(mixed, rebuilt, atol=1e-6)
    # The teacher saw exactly that view, in its own geometry, and its logits are the targets'.
    assert torch.allclose(teacher.seen[-1], teacher_inputs(mixed, STUDENT, TEACHER), atol=1e-6)
    assert torch.allclose(targets[:, TEACHER_FROM:], teacher.net(teacher.seen[-1]), atol=1e-6)
    # Reproducible per epoch (resuming stays exact), different across epochs.
    seed_epoch(3, 0)
    again, _ = hook(inputs, labels)
    seed_epoch(3, 1)
    other, _ = hook(inputs, labels)
    assert torch.equal(again, mixed) and not torch.equal(other, mixed)


def test_without_mixup_the_teacher_sees_the_unmixed_view():
    teacher = RecordingTeacher()
    inputs, labels = torch.randn(3, 3, 12, 16), torch.tensor([1, 2, 3])
    mixed, targets = MixedTeacherTargets(teacher, STUDENT, TEACHER, mixup=0.0)(inputs, labels)
    assert torch.allclose(mixed, inputs) and torch.equal(targets[:, 2], torch.ones(3))
    with pytest.raises(ValueError):
        MixedTeacherTargets(teacher, STUDENT, TEACHER, mixup=-1.0)


def test_loss_is_the_distillation_loss_when_nothing_is_mixed_and_the_mixup_cross_entropy_otherwise():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 7), torch.randn(5, 7)
    first, second = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([6, 5, 4, 3, 2])
    weight = torch.linspace(0.5, 2.0, 7)
    unmixed = torch.cat([first.float().view(-1, 1), second.float().view(-1, 1), torch.ones(5, 1), teacher], 1)
    for alpha in (0.0, 0.5, 1.0):
        assert torch.allclose(FunctionMatchingLoss(weight, 2.0, alpha)(logits, unmixed),
                              DistillationLoss(weight, 2.0, alpha)(logits, pack_targets(first, teacher)), atol=1e-6)
    # Half and half: the class-weighted mean over both labels of every image.
    halves = unmixed.clone()
    halves[:, 2] = 0.5
    both = torch.cat([first, second])
    expected = nn.functional.cross_entropy(torch.cat([logits, logits]), both, weight=weight)
    assert torch.allclose(FunctionMatchingLoss(weight, 2.0, 0.0)(logits, halves), expected, atol=1e-6)
