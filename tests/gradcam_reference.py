"""Independent references for the explanation maps, used only as test oracles, and the random networks they are checked on."""

import torch

from handler.architectures import LogitAverage, build_model, default_preprocess_config, feature_layer


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


def stride16_layers(network):
    """The modules whose outputs are a single network's first and last stride-16 maps (by name, not by handler.stages)."""
    if hasattr(network, "blocks"):  # timm EfficientNet
        return network.blocks[3], network.blocks[4]
    return network.features[4], network.features[5]  # torchvision EfficientNet


def networks_of(model):
    return list(model.members) if hasattr(model, "members") else [model]


def autograd_layercam(model, inputs, targets):
    """Textbook LayerCAM on the last stride-16 map of each network, summed over an ensemble's members:
    hooks on the full model's forward, one backward of the summed target logits."""
    captured = []
    handles = [stride16_layers(net)[1].register_forward_hook(lambda m, a, out: captured.append(out))
               for net in networks_of(model)]
    try:
        with torch.enable_grad():
            logits = model(inputs.clone().requires_grad_(True))
            grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured)
    finally:
        for handle in handles:
            handle.remove()
    return torch.relu(sum((torch.relu(g) * a).sum(dim=1) for g, a in zip(grads, captured))).detach()


def hooked_rise(model, image, target, masks, blurred, to_scores=lambda logits: logits.softmax(dim=1)):
    """RISE's raw saliency by brute force: the full model run on the image once per mask, a forward hook
    replacing each network's first stride-16 map with blurred + mask * (image - blurred)."""
    layers = [stride16_layers(net)[0] for net in networks_of(model)]
    maps = {}
    with torch.no_grad():
        for layer in layers:
            handle = layer.register_forward_hook(lambda m, a, out, layer=layer: maps.__setitem__(layer, out))
            model(torch.stack([image, blurred]))
            handle.remove()
        handles = [layer.register_forward_hook(
            lambda m, a, out, layer=layer: maps[layer][1:2] + masks[:, None] * (maps[layer][0:1] - maps[layer][1:2]))
            for layer in layers]
        try:
            scores = to_scores(model(image[None].expand(len(masks), -1, -1, -1)))[:, target]
        finally:
            for handle in handles:
                handle.remove()
    return torch.einsum("n,nhw->hw", scores - scores.mean(), masks) / masks.sum(dim=0).clamp(min=1e-6)


def random_model(arch, seed):
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    # Random BN statistics and head so that feature maps and class weights are not trivial.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def random_ensemble(seed):
    """Two random Lite0 networks averaged: the released model's structure, with nothing learned."""
    return LogitAverage([random_model("efficientnet_lite0", seed), random_model("efficientnet_lite0", seed + 100)]).eval()


def random_network(source, seed):
    if source == "ensemble":
        return random_ensemble(seed), default_preprocess_config("efficientnet_lite0")
    return random_model(source, seed), default_preprocess_config(source)
