import torch

from nern.layers import conv_weights, find_conv_layers
from nern.losses import reconstruction_loss
from nern.predictor import Predictor
from nern.reconstruct import (
    Representation,
    identity_positions,
    kernels_to_weights,
    predict_kernels,
    reconstructed_model,
    run_reconstructed,
    weights_to_kernels,
)

from helpers import UserCNN


def setup():
    torch.manual_seed(0)
    model = UserCNN().eval()
    layers = find_conv_layers(model)
    rep = Representation(layers, identity_positions(layers))
    return model, layers, rep


def test_weights_roundtrip_through_kernel_table_and_crop():
    model, layers, rep = setup()
    originals = conv_weights(model, layers)
    back = kernels_to_weights(weights_to_kernels(originals), rep)
    assert all(torch.equal(a, b) for a, b in zip(originals, back))


def test_functional_call_with_original_weights_is_the_original_network():
    model, layers, rep = setup()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(run_reconstructed(model, rep, conv_weights(model, layers), x), model(x))


def test_coordinates_are_raw_integers_per_layer():
    _, layers, rep = setup()
    coords = rep.coordinates()
    assert coords.shape == (rep.num_kernels, 3)
    first = coords[: layers[0].num_kernels]
    cin = layers[0].shape[1]
    assert torch.equal(first[:, 1], torch.arange(layers[0].num_kernels) // cin)
    assert torch.equal(first[:, 2], torch.arange(layers[0].num_kernels) % cin)
    assert coords[-1, 0] == len(layers) - 1


def test_gradient_reaches_predictor_only_through_sampled_kernels():
    model, layers, rep = setup()
    emb = rep.embeddings(4, 0.76)
    predictor = Predictor(emb.shape[1], 16, depth=3)
    sampled = torch.tensor([0, 5, 5, 40, rep.num_kernels - 1])
    outputs = {}

    def keep(module, inp, out):
        if out.requires_grad:
            out.retain_grad()
            outputs["grad_rows"] = out

    handle = predictor[-1].register_forward_hook(keep)
    kernels = predict_kernels(predictor, emb, sampled)
    handle.remove()
    weights = kernels_to_weights(kernels, rep)
    x = torch.randn(2, 1, 28, 28)
    loss = run_reconstructed(model, rep, weights, x).square().sum() + reconstruction_loss(weights, conv_weights(model, layers))
    kernels.retain_grad()
    loss.backward()
    # the grad-carrying forward saw exactly the sampled rows
    assert outputs["grad_rows"].shape[0] == len(sampled)
    # the full kernel table has gradient everywhere (network loss), but only sampled rows feed the predictor
    assert kernels.grad.abs().sum(1).gt(0).sum() > len(set(sampled.tolist()))
    manual = kernels.grad[sampled]
    assert torch.allclose(outputs["grad_rows"].grad, manual)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())


def test_no_gradient_when_nothing_sampled_differs_from_all():
    model, layers, rep = setup()
    emb = rep.embeddings(4, 0.76)
    predictor = Predictor(emb.shape[1], 16, depth=3)
    full = predict_kernels(predictor, emb, None)
    part = predict_kernels(predictor, emb, torch.tensor([1, 2]))
    assert torch.allclose(full, part)  # same values, only the gradient path differs


def test_reconstructed_model_copy_holds_weights():
    model, layers, rep = setup()
    weights = [torch.zeros_like(w) for w in conv_weights(model, layers)]
    copy = reconstructed_model(model, rep, weights)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in conv_weights(copy, layers))
    assert not torch.equal(conv_weights(model, layers)[0], weights[0])
