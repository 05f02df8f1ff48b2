"""An independent, autograd-based Grad-CAM used only as a test oracle."""

import torch

from handler.architectures import feature_layer


def autograd_gradcam(model, inputs, targets):
    """Textbook Grad-CAM: hook the last stage, backpropagate each target logit, ReLU(sum(mean grad * A))."""
    captured = {}
    layer = feature_layer(model)
    handle = layer.register_forward_hook(lambda module, args, output: captured.__setitem__("a", output))
    try:
        with torch.enable_grad():
            x = inputs.clone().requires_grad_(True)
            logits = model(x)
            activations = captured["a"]
            score = logits.gather(1, targets[:, None]).sum()
            grads = torch.autograd.grad(score, activations)[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1)).detach()
