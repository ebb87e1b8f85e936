"""The model's one forward path and its straightforward view (``epure.model.reference``) compute the same numbers.

The forward path batches decoding by target, runs channels-last, folds nearest upsampling into transposed
convolutions, runs 1x1 convolutions as matmuls, projects the condition once per example and runs the networks
on chunks of rows; training backpropagates chunk by chunk (``epure.model.backward``) (docs/performance.md).
None of that may change the loss, the gradients or the samples beyond float32 rounding, in the encoders as in
the decoders.
"""

from __future__ import annotations

import pytest
import torch

import epure.model.mmvae
from epure.model import MMVAEPlus, forward_objective
from epure.model.backward import objective_backward
from epure.model.convolutions import MaskConv2d, PointwiseConv2d, UpsampleConv2d
from epure.model.generation import completion_probabilities, unconditional_probabilities
from epure.model.networks import GROUPED_MAX_WIDTH
from epure.model.objectives import draw_strata
from epure.model.reference import StraightforwardModel, conv

from factories import tiny_config

# float32: the two paths sum in different orders, and kernels of different vector widths round differently
# (1.09e-5 seen on an AVX-512 CPU); the exact check is in float64, parameter by parameter.
TOLERANCE = 1e-4
FLOAT64_TOLERANCE = 1e-10


def small_model(m: int, family: str, decoder_output: str = "upsample", moments: bool = False,
                encoder_input: str = "full", nf_max: int = 16) -> MMVAEPlus:
    """With ``moments``, the encoders see the masks' shape moments, standardised on random masks like the tests'
    (not by 0 and 1). ``nf_max`` above ``GROUPED_MAX_WIDTH`` runs the encoders one by one, else as one network."""
    components = [f"c{i}" for i in range(m)]
    cfg = tiny_config(None, ".", components, **{"model.priorposterior": family, "model.decoder_output": decoder_output,
                                                "model.encoder_moments": moments, "model.encoder_input": encoder_input,
                                                "model.nf_max": nf_max})
    torch.manual_seed(0)
    model = MMVAEPlus(cfg.model, components, cfg.data.image_size)
    model.standardise_moments((torch.rand(32, m, 64, 32) > 0.6).to(torch.uint8) * 255)  # as the tests' masks
    return model


def loss_and_gradients(model: MMVAEPlus, x, c, objective: str, k: int, straightforward: bool):
    torch.manual_seed(7)  # the same noise on both paths
    model.zero_grad()
    out = forward_objective(StraightforwardModel(model) if straightforward else model, x, c, objective, beta=2.5, k=k)
    out.loss.backward()
    return out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("family,decoder_output,moments,encoder_input,nf_max",
                         [("Laplace", "upsample", False, "full", 32), ("Normal", "upsample", False, "full", 16),
                          ("Normal", "pixel_shuffle", True, "pixel_unshuffle", 16)])
@pytest.mark.parametrize("objective,k", [("elbo", 1), ("dreg", 3)])
@pytest.mark.parametrize("m", [3, 5])
def test_fast_and_straightforward_paths_agree(m: int, objective: str, k: int, family: str,
                                              decoder_output: str, moments: bool, encoder_input: str,
                                              nf_max: int) -> None:
    """The one forward path (narrow encoders as one grouped network, wider ones one by one channels-last, the
    decoders' workarounds) computes the loss and every gradient the straightforward one does (each tower and
    decoder called on its own, plain convolutions)."""
    assert GROUPED_MAX_WIDTH == 16  # the cases run both encoder paths
    model = small_model(m, family, decoder_output, moments, encoder_input, nf_max)
    g = torch.Generator().manual_seed(m)
    x, c = (torch.rand(4, m, 64, 32, generator=g) > 0.6).float(), torch.randn(4, 2, generator=g)
    fast_loss, fast_grads = loss_and_gradients(model, x, c, objective, k, straightforward=False)
    ref_loss, ref_grads = loss_and_gradients(model, x, c, objective, k, straightforward=True)
    assert relative_error(fast_loss, ref_loss) < TOLERANCE
    assert relative_error(fast_grads, ref_grads) < TOLERANCE
    for p in model.parameters():
        assert p.grad is not None

    model = model.double()  # in float64, every parameter's gradient on its own: no error hides in the norm
    x, c = x.double(), c.double()
    fast_loss, fast_grads = loss_and_gradients(model, x, c, objective, k, straightforward=False)
    ref_loss, ref_grads = loss_and_gradients(model, x, c, objective, k, straightforward=True)
    assert relative_error(fast_loss, ref_loss) < FLOAT64_TOLERANCE
    sizes = [p.numel() for p in model.parameters()]
    for (name, _), fast, ref in zip(model.named_parameters(), fast_grads.split(sizes), ref_grads.split(sizes)):
        error = relative_error(fast, ref) if ref.abs().max() > 0 else fast.abs().max().item()
        assert error < FLOAT64_TOLERANCE, name


# Every pair of values of any two of the four settings appears in some case (8 cases instead of the 32 of the
# full product, which took a third of the suite's time).
CHUNKED_CASES = [(3, "elbo", 1, True, 0), (5, "elbo", 1, False, 2), (3, "dreg", 1, False, 2), (5, "dreg", 1, True, 0),
                 (3, "elbo", 2, True, 2), (5, "elbo", 2, False, 0), (3, "dreg", 3, False, 0), (5, "dreg", 3, True, 2)]


@pytest.mark.parametrize("m,objective,k,recompute_encoders,strata_per_design", CHUNKED_CASES)
def test_chunked_backward_equals_the_one_graph_backward(m: int, objective: str, k: int, recompute_encoders: bool,
                                                        strata_per_design: int) -> None:
    """Training's backward, chunk by chunk, against ``forward_objective(...).loss.backward()``: loss, bound,
    logged terms and every parameter's gradient, with designs that lack components and chunks that split both
    the examples and a target's sources; with every available source a stratum, or 2 of them drawn (then the
    chunked backward decodes those alone, the one graph decodes every pair). In float64, so that every
    parameter's gradient is checked on its own (in float32 a small one, like the auxiliary priors', differs by a
    relative 1e-5 from summation order). The five-component cases' encoders also see shape moments."""
    model = small_model(m, "Laplace", moments=m == 5).double()
    g = torch.Generator().manual_seed(10 + m)
    x, c = (torch.rand(7, m, 64, 32, generator=g) > 0.6).double(), torch.randn(7, 2, generator=g).double()
    available = torch.ones(7, m, dtype=torch.bool)
    available[0, 1], available[3, [0, m - 1]], available[5, 2:] = False, False, False
    x = x * available[:, :, None, None]
    strata = draw_strata(available, strata_per_design)
    if strata_per_design:
        assert not torch.equal(strata, available)  # the case under test: some sources are not strata
    one_graph = forward_objective_and_gradients(model, x, c, objective, k, available, strata)
    torch.manual_seed(7)
    model.zero_grad()
    out = objective_backward(model, x, c, objective, 2.5, k, available=available, strata=strata,
                             decoder_rows=2 * k * m + 1, encoder_rows=3, recompute_encoders=recompute_encoders)
    assert not out.loss.requires_grad
    assert relative_error(out.loss, one_graph.loss) < FLOAT64_TOLERANCE
    assert relative_error(out.bound, one_graph.bound) < FLOAT64_TOLERANCE
    for name, value in one_graph.terms.items():
        assert relative_error(out.terms[name], value) < FLOAT64_TOLERANCE, name
    for (name, p), expected in zip(model.named_parameters(), one_graph.grads):
        assert relative_error(p.grad, expected) < FLOAT64_TOLERANCE, name


def forward_objective_and_gradients(model: MMVAEPlus, x, c, objective: str, k: int, available, strata):
    torch.manual_seed(7)
    model.zero_grad()
    out = forward_objective(model, x, c, objective, beta=2.5, k=k, available=available, strata=strata)
    out.loss.backward()
    out.grads = [p.grad.clone() for p in model.parameters()]
    return out


def test_networks_split_into_chunks_compute_what_one_call_does(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model(3, "Laplace")
    g = torch.Generator().manual_seed(4)
    x, c = (torch.rand(7, 3, 64, 32, generator=g) > 0.6).float(), torch.randn(7, 2, generator=g)
    u, pairs = torch.randn(7, 3, model.cfg.latent_dim_u, generator=g), torch.randn(2, 7, 3, 3, model.cfg.latent_dim_u)
    with torch.no_grad():
        emb = model.cond(c)
        whole = [model.decode(u, emb), model.encode(x, emb).z_scale, model.decode_pairs(pairs, emb)]
        monkeypatch.setattr(epure.model.mmvae, "ENCODER_CHUNK_ROWS", 3)
        monkeypatch.setattr(epure.model.mmvae, "DECODER_CHUNK_ROWS", 5)
        chunked = [model.decode(u, emb), model.encode(x, emb).z_scale, model.decode_pairs(pairs, emb)]
    for one, split in zip(whole, chunked):
        assert one.shape == split.shape
        assert relative_error(split, one) < TOLERANCE


def test_sampling_paths_agree() -> None:
    model = small_model(3, "Laplace", moments=True).eval()
    reference = StraightforwardModel(model)
    g = torch.Generator().manual_seed(1)
    x, c = (torch.rand(4, 3, 64, 32, generator=g) > 0.6).float(), torch.randn(4, 2, generator=g)
    emb = model.cond(c)
    u = torch.randn(4, 3, model.cfg.latent_dim_u, generator=g)
    with torch.no_grad():
        assert relative_error(model.decode(u, emb), reference.decode(u, emb)) < TOLERANCE
        fast, ref = model.encode(x, emb), reference.encode(x, emb)
    for name in ("w_loc", "w_scale", "z_loc", "z_scale"):
        assert relative_error(getattr(fast, name), getattr(ref, name)) < TOLERANCE
    for path in (model, reference):  # the same draws (seeded generators) through either path
        path.samples = [unconditional_probabilities(path, c, torch.Generator().manual_seed(2)),
                        completion_probabilities(path, x, c, [0, 2], generator=torch.Generator().manual_seed(3))]
    for fast_sample, ref_sample in zip(model.samples, reference.samples):
        assert relative_error(fast_sample, ref_sample) < TOLERANCE


@pytest.mark.parametrize("layer,shape", [(UpsampleConv2d(3, 5), (2, 3, 4, 6)), (PointwiseConv2d(3, 5, 2), (2, 3, 8, 6)),
                                         (MaskConv2d(3), (2, 3, 8, 6)), (MaskConv2d(3, upscale=2), (2, 3, 4, 3))])
def test_convolution_workarounds_are_the_plain_convolution(layer: torch.nn.Conv2d, shape: tuple) -> None:
    """Each workaround equals the plain convolution of its own weights (of the upsampled input, for the
    upsampling one), in float64 to rounding, and in the channels-last format the networks use."""
    torch.manual_seed(0)
    layer = layer.double()
    h = torch.randn(*shape, dtype=torch.float64)
    plain = h if not isinstance(layer, UpsampleConv2d) else torch.nn.functional.interpolate(h, scale_factor=2.0)
    expected = conv(layer, plain)
    if isinstance(layer, MaskConv2d):  # one channel, or 4 pixel-shuffled into 2x2 blocks
        expected = torch.nn.functional.pixel_shuffle(expected, layer.upscale).squeeze(1)
        assert expected.shape == (shape[0], shape[2] * layer.upscale, shape[3] * layer.upscale)
    torch.testing.assert_close(layer(h), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(h.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-12,
                               atol=1e-12)
