"""Fitting the post-hoc calibration that :class:`handler.calibration.Calibration` applies when serving.

Offline work, so it lives in the lab: the served archive carries only the calibration's values
(``meta.calibration`` of the checkpoint) and the code that applies them.
"""

from __future__ import annotations

import torch

from handler.calibration import Calibration


# How the per-class biases are set: ``fitted`` fits one free bias per class with the temperature
# (right for a network trained on the data's own class frequencies); ``prior_shift`` fits the
# temperature only and sets the biases to the log class frequencies of the calibration set, the
# Bayes prior shift for a network trained to be class-balanced (inverse-frequency class weights,
# power 1: its softmax estimates the posterior under equal priors, Menon et al. 2021 "logit
# adjustment"). With prior_shift the balanced decision rule gives back the network's own argmax,
# instead of a rule bent by six noisy biases fitted on classes of 8 to 70 validation lesions.
CLASS_BIAS_METHODS: tuple[str, ...] = ("fitted", "prior_shift")


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, class_bias: bool = True, max_iter: int = 500,
                    bias_method: str = "fitted") -> Calibration:
    """Fit the temperature (and, by default, per-class biases) that minimize validation NLL.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) true class indices.
        class_bias: Also set one additive bias per class (the prior correction), by ``bias_method``.
        max_iter: L-BFGS iterations.
        bias_method: One of :data:`CLASS_BIAS_METHODS`.

    Returns:
        The fitted calibration, with the label frequencies as its ``class_prior`` (a class
        absent from ``labels`` counts as one image, so the prior stays positive).
    """
    if bias_method not in CLASS_BIAS_METHODS:
        raise ValueError(f"unknown class-bias method {bias_method!r}; choose one of {list(CLASS_BIAS_METHODS)}")
    logits = logits.detach().float().clone()  # a plain tensor, even if made under inference_mode
    counts = torch.bincount(labels, minlength=logits.shape[1]).clamp(min=1).double()
    frequencies = counts / counts.sum()
    fit_bias = class_bias and bias_method == "fitted"
    log_temperature = torch.zeros(1, requires_grad=True)
    bias = torch.zeros(logits.shape[1], requires_grad=True) if fit_bias else frequencies.log().float()
    parameters = [log_temperature, bias] if fit_bias else [log_temperature]
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
    prior = tuple(round(float(p), 6) for p in frequencies)
    return Calibration(float(log_temperature.exp().item()), tuple(round(b, 6) for b in centred) if centred else None, prior)
