"""Function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent"): the teacher runs online on exactly the view the student trains on, mixed up.

Why: cached teacher logits of the training images are the teacher's fit to images it trained on
(release 1.6.1's ensemble calls 0.896 of its sharp training copies right, balanced, against 0.728 of
the validation copies), so they say little more than the hard labels. A mixup of two training images,
cropped and flipped as the student sees it, is an image neither network trained on: the teacher's
answer to it carries how the teacher generalizes, which is what a student should copy.

The pieces: :func:`teacher_inputs` shows the teacher the student's view in the teacher's own
geometry, :class:`MixedTeacherTargets` mixes a batch and asks the teacher (the batch hook of
:class:`lab.training.Trainer`), and :class:`FunctionMatchingLoss` scores the student against it.
"""

from __future__ import annotations

import torch
from torch import nn

from handler.preprocessing import PreprocessConfig
from lab.distillation import DistillationLoss

# Columns of the packed targets before the teacher's logits: first label, second label, mixing weight.
LABEL_A, LABEL_B, WEIGHT_A, TEACHER_FROM = 0, 1, 2, 3


def teacher_inputs(inputs: torch.Tensor, student: PreprocessConfig, teacher: PreprocessConfig) -> torch.Tensor:
    """The student's normalized batch as the teacher expects it: resized to the teacher's input (the
    whole view, antialiased) and renormalized with the teacher's mean and std."""
    height, width = teacher.input_height, teacher.input_width
    pixels = inputs * inputs.new_tensor(student.std).view(1, -1, 1, 1) + inputs.new_tensor(student.mean).view(1, -1, 1, 1)
    if pixels.shape[-2:] != (height, width):
        pixels = nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False,
                                           antialias=True)
    normalized = (pixels - pixels.new_tensor(teacher.mean).view(1, -1, 1, 1)) / pixels.new_tensor(teacher.std).view(1, -1, 1, 1)
    return normalized.contiguous(memory_format=torch.channels_last)


class MixedTeacherTargets:
    """Mixes each training batch with a shuffled copy of itself and asks the teacher about the result.

    Each image gets its own weight ``w ~ Beta(mixup, mixup)`` (drawn from torch's generator, so
    :func:`lab.training.seed_epoch` makes it reproducible); the image is ``w * a + (1 - w) * b``.

    Args:
        teacher: The teacher network (eval mode, no gradients), on the training device.
        student_preprocess: The student's preprocessing (the batch arrives normalized with it).
        teacher_preprocess: The teacher's (its input size, mean and std).
        mixup: The Beta distribution's parameter; 0 shows the teacher the unmixed views.
    """

    def __init__(self, teacher: nn.Module, student_preprocess: PreprocessConfig, teacher_preprocess: PreprocessConfig,
                 mixup: float) -> None:
        if mixup < 0:
            raise ValueError(f"mixup must be >= 0, got {mixup}")
        self.teacher = teacher.eval()
        self.student_preprocess = student_preprocess
        self.teacher_preprocess = teacher_preprocess
        self.mixup = mixup

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch, and ``(B, 3 + C)`` targets: both labels, the first's weight, the teacher's logits."""
        count = len(inputs)
        if self.mixup > 0:
            weights = torch.distributions.Beta(self.mixup, self.mixup).sample((count,)).to(inputs.device)
            partner = torch.randperm(count).to(inputs.device)
        else:
            weights, partner = inputs.new_ones(count), torch.arange(count, device=inputs.device)
        shaped = weights.view(-1, 1, 1, 1).to(inputs.dtype)
        mixed = (shaped * inputs + (1 - shaped) * inputs[partner]).contiguous(memory_format=torch.channels_last)
        logits = self.teacher(teacher_inputs(mixed, self.student_preprocess, self.teacher_preprocess)).float()
        targets = torch.cat([labels.float().view(-1, 1), labels[partner].float().view(-1, 1),
                             weights.float().view(-1, 1), logits], dim=1)
        return mixed, targets


class FunctionMatchingLoss(DistillationLoss):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * mixed class-weighted CE``.

    :class:`lab.distillation.DistillationLoss` with the mixup cross-entropy: ``w * CE(a) + (1 - w) *
    CE(b)`` per image, with the recipe's class weights (so the network's argmax stays the balanced
    rule's, as for the other students). Same arguments.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        first, second = targets[:, LABEL_A].long(), targets[:, LABEL_B].long()
        share, teacher = targets[:, WEIGHT_A], targets[:, TEACHER_FROM:]
        # Weighted CE normalized like nn.functional.cross_entropy(weight=...): by the summed weights.
        per_image = (share * nn.functional.cross_entropy(logits, first, weight=self.weight, reduction="none")
                     + (1 - share) * nn.functional.cross_entropy(logits, second, weight=self.weight, reduction="none"))
        normalizer = (share * self.weight[first] + (1 - share) * self.weight[second]).sum()
        return self.alpha * self.soft_term(logits, teacher) + (1.0 - self.alpha) * per_image.sum() / normalizer
