"""Fitting the post-hoc calibration that :class:`handler.calibration.Calibration` applies when serving.

Offline work, so it lives in the lab: the served archive carries only the calibration's values
(``meta.calibration`` of the checkpoint) and the code that applies them.
"""

from __future__ import annotations

import torch

from handler.calibration import Calibration


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, class_bias: bool = True, max_iter: int = 500) -> Calibration:
    """Fit the temperature (and, by default, per-class biases) that minimize validation NLL.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) true class indices.
        class_bias: Also fit one additive bias per class (the prior correction).
        max_iter: L-BFGS iterations.

    Returns:
        The fitted calibration, with the label frequencies as its ``class_prior`` (a class
        absent from ``labels`` counts as one image, so the prior stays positive).
    """
    logits = logits.detach().float().clone()  # a plain tensor, even if made under inference_mode
    log_temperature = torch.zeros(1, requires_grad=True)
    bias = torch.zeros(logits.shape[1], requires_grad=True)
    parameters = [log_temperature, bias] if class_bias else [log_temperature]
    optimizer = torch.optim.LBFGS(parameters, lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_temperature.exp() + (bias if class_bias else 0.0)
        loss = torch.nn.functional.cross_entropy(scaled, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Softmax is unchanged by a common shift, so centre the biases for a unique, readable answer.
    centred = (bias - bias.mean()).tolist() if class_bias else None
    counts = torch.bincount(labels, minlength=logits.shape[1]).clamp(min=1).double()
    prior = tuple(round(float(p), 6) for p in counts / counts.sum())
    return Calibration(float(log_temperature.exp().item()), tuple(round(b, 6) for b in centred) if centred else None, prior)
