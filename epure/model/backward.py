"""The training step's forward and backward, holding the networks' graphs one chunk of examples at a time.

    >>> import torch
    >>> from epure.config import load_config
    >>> from epure.model import MMVAEPlus
    >>> from epure.model.backward import objective_backward
    >>> cfg = load_config("small")
    >>> model = MMVAEPlus(cfg.model, cfg.data.components, cfg.data.image_size)
    >>> out = objective_backward(model, torch.zeros(2, 5, 64, 32), torch.zeros(2, 2), "elbo", beta=2.5)
    >>> model.decoders[0].fc.weight.grad is not None  # the gradients are in .grad; out.loss is detached
    True

``forward_objective(...).loss.backward()`` keeps the graph of every encoder and of all M^2 (source, target)
decodings until the backward: 7 to 8 GB at the default config and batch 128, most of it activations of
64x32 feature maps. The objectives see the networks only through the encoders' outputs and the
log-likelihoods lpx [K, B, M_source, M_target], so the backward splits there:

1. the encoders run without a graph; their outputs become leaves, and the latents are drawn from them;
2. g = d loss / d lpx, the objective's gradient with every latent held fixed. For K = 1 the bound is linear in
   lpx (a log-mean-exp over one sample is the identity), so g does not depend on lpx and is taken at lpx = 0;
   for K > 1 it does (importance weights), and lpx is first computed without a graph;
3. for each target decoder and each chunk of examples: decode with a graph, backpropagate g's share into the
   decoder's parameters, the chunk's latents and its condition embedding; the graph is freed. Only the strata's
   latents are decoded: a source that is not a stratum of its design this step has g = 0;
4. the objective on the leaves with lpx as a constant, backpropagated together with the latents' gradients of
   step 3: the gradients of the encoders' outputs and of the auxiliary priors. DReG's path reweighting sees
   everything that reaches the draws, because the decoders' latents are built from the same draws;
5. each encoder again, chunk by chunk, with a graph, backpropagating its outputs' gradients; last the
   condition network, with the embedding's gradient summed over every encoder and decoder.

Peak memory is then one chunk's graph and the batch's latents instead of every graph, and the small tensors of
a chunk stay in the CPU's caches (measured: faster than one batch-wide graph despite step 5's second encoder
pass; docs/performance.md). The gradients equal ``forward_objective``'s up to float rounding
(tests/test_speed_paths.py). K > 1 costs one more forward pass of the decoders (step 2).
"""

from __future__ import annotations

import torch

from epure.model.mmvae import MMVAEPlus, chunk_rows, row_chunks
from epure.model.objectives import (OBJECTIVES, Evaluation, LatentDraws, ObjectiveOutput, all_available,
                                    decoder_inputs, draw_latents, model_log_likelihood)


def objective_backward(model: MMVAEPlus, x: torch.Tensor, conditions: torch.Tensor, objective: str = "elbo",
                       beta: float = 1.0, k: int = 1, share: tuple[int, int] | None = None,
                       available: torch.Tensor | None = None, strata: torch.Tensor | None = None,
                       decoder_rows: int | None = None,
                       encoder_rows: int | None = None, recompute_encoders: bool | None = None) -> ObjectiveOutput:
    """``forward_objective`` and its backward: the parameters' ``.grad`` accumulate the loss's gradient; the
    returned loss is detached. ``strata``: as ``forward_objective``; only the strata's (source, target) pairs are
    decoded (the others have no gradient). ``decoder_rows`` and ``encoder_rows`` bound the rows whose graph is held
    (default: ``mmvae.chunk_rows`` of x's device);
    ``recompute_encoders``: run the encoders twice (steps 1 and 5) rather than keep their graph; by default
    when the batch is larger than one encoder chunk (a chunk's graph costs what keeping it costs)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; registered: {', '.join(OBJECTIVES)}")
    available = all_available(x) if available is None else available
    strata = available if strata is None else strata
    b, m = x.shape[:2]
    default_encoder_rows, default_decoder_rows = chunk_rows(x.device)
    encoder_rows, decoder_rows = encoder_rows or default_encoder_rows, decoder_rows or default_decoder_rows
    cond_emb = model.cond(conditions)
    cond_free = cond_emb.detach()
    cond_grad = torch.zeros_like(cond_free)
    if recompute_encoders is None:
        recompute_encoders = b > encoder_rows
    if recompute_encoders:
        with torch.no_grad():  # 1.
            outputs = [output.requires_grad_() for output in model.encoder_outputs(x, cond_free)]
    else:
        outputs = model.encoder_outputs(x, cond_emb)
    post = model.posteriors(*outputs)
    draws = draw_latents(model, post, k, share)
    z_drawn = draws.z
    draws = LatentDraws(draws.w, draws.z.clone(), draws.w_aux)  # as ``evaluate``: DReG's node for z
    u = decoder_inputs(draws)  # [K, B, M_source, M_target, du]
    u_free = u.detach()
    sources = int(strata.sum(1).max())  # the most strata of any design: decoder rows per example and sample
    chunks = row_chunks(b, max(1, decoder_rows // (k * sources)))
    lpx = u_free.new_zeros(k, b, m, m) if k == 1 else \
        decoded_log_likelihoods(model, x, u_free, cond_free, chunks, strata)
    lpx_grad = objective_lpx_gradient(model, x, post, draws, z_drawn, lpx, k, available, strata, objective,
                                      beta)  # 2.
    lpx, u_grad = decoders_backward(model, x, u_free, cond_free, cond_grad, chunks, lpx_grad, strata)  # 3.
    out = OBJECTIVES[objective](Evaluation(model, x, post, draws, z_drawn, lpx, k, available, strata), beta)  # 4.
    if not recompute_encoders:
        torch.autograd.backward([out.loss, u, cond_emb], [torch.ones_like(out.loss), u_grad, cond_grad])
        return ObjectiveOutput(out.loss.detach(), out.bound, out.terms)
    torch.autograd.backward([out.loss, u], [torch.ones_like(out.loss), u_grad])
    encoders_backward(model, x, cond_free, cond_grad, [output.grad for output in outputs], encoder_rows)  # 5.
    cond_emb.backward(cond_grad)
    return ObjectiveOutput(out.loss.detach(), out.bound, out.terms)


@torch.no_grad()
def decoded_log_likelihoods(model: MMVAEPlus, x: torch.Tensor, u: torch.Tensor, cond_emb: torch.Tensor,
                            chunks: list[slice], strata: torch.Tensor) -> torch.Tensor:
    """lpx [K, B, M_source, M_target] of every stratum's pairs (0 for the other sources), without a graph."""
    k, b, m = u.shape[:3]
    lpx = u.new_zeros(k, b, m, m)
    for n in range(m):
        for rows in chunks:
            target_log_likelihoods(model, x, n, rows, u[:, rows, :, n], cond_emb[rows], strata[rows],
                                   out=lpx[:, rows, :, n])
    return lpx


def decoders_backward(model: MMVAEPlus, x: torch.Tensor, u: torch.Tensor, cond_emb: torch.Tensor,
                      cond_grad: torch.Tensor, chunks: list[slice], lpx_grad: torch.Tensor,
                      strata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: every target decoder chunk by chunk on the strata's latents, backpropagating lpx_grad; -> (lpx,
    d loss / d u), both 0 for sources that are not strata. The condition embedding's gradient is added to
    ``cond_grad``."""
    k, b, m = u.shape[:3]
    lpx, u_grad = u.new_zeros(k, b, m, m), torch.zeros_like(u)
    for n in range(m):
        for rows in chunks:
            u_rows = u[:, rows, :, n].requires_grad_()
            cond_rows = cond_emb[rows].requires_grad_()
            sel, grad = strata[rows], lpx_grad[:, rows, :, n]
            lpx_rows = target_log_likelihoods(model, x, n, rows, u_rows, cond_rows, sel, out=lpx[:, rows, :, n])
            lpx_rows.backward(grad if sel.all() else grad[:, sel])
            u_grad[:, rows, :, n] = u_rows.grad
            cond_grad[rows] += cond_rows.grad
    return lpx, u_grad


def encoders_backward(model: MMVAEPlus, x: torch.Tensor, cond_emb: torch.Tensor, cond_grad: torch.Tensor,
                      output_grads: list[torch.Tensor], rows_per_chunk: int) -> None:
    """Step 5: the encoders again, chunk by chunk, with a graph, backpropagating their outputs' gradients; the
    condition embedding's gradient is added to ``cond_grad``."""
    for rows in row_chunks(x.shape[0], rows_per_chunk):
        cond_rows = cond_emb[rows].requires_grad_()
        torch.autograd.backward(model.encoder_outputs(x[rows], cond_rows), [g[rows] for g in output_grads])
        cond_grad[rows] += cond_rows.grad


def target_log_likelihoods(model: MMVAEPlus, x: torch.Tensor, n: int, rows: slice, u: torch.Tensor,
                           cond_emb: torch.Tensor, strata: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Target n's log-likelihoods from its decoder inputs u [K, rows, M_source, du], of the sources that are
    strata (bool [rows, M_source]), written (detached) into ``out`` [K, rows, M_source]; returned with their graph:
    [K, rows, M_source] when every source is a stratum, else [K, strata] (the strata in row-major order)."""
    if strata.all():  # one decoder call on every (sample, example, source) row, the condition's share per example
        lpx = model_log_likelihood(model, model.decode_target(n, u, cond_emb), x[None, rows, None, n])
        out.copy_(lpx.detach())
        return lpx
    k, r, m, _ = u.shape
    cond = cond_emb[:, None].expand(r, m, cond_emb.shape[-1])[strata]  # [strata, F]
    target = x[rows, None, n].expand(r, m, *x.shape[2:])[strata]  # [strata, H, W]
    logits = model.decoders[n](u[:, strata], cond[None]).view(k, -1, *model.image_size)
    lpx = model_log_likelihood(model, logits, target[None])  # [K, strata]
    out[:, strata] = lpx.detach()
    return lpx


def objective_lpx_gradient(model: MMVAEPlus, x, post, draws: LatentDraws, z_drawn, lpx: torch.Tensor, k: int,
                           available: torch.Tensor, strata: torch.Tensor, objective: str,
                           beta: float) -> torch.Tensor:
    """d loss / d lpx [K, B, M, M] at these log-likelihoods, every latent held fixed."""
    lpx = lpx.detach().requires_grad_()
    fixed = LatentDraws(draws.w.detach(), draws.z.detach(), draws.w_aux.detach())
    with torch.enable_grad():
        loss = OBJECTIVES[objective](Evaluation(model, x, post.detached(), fixed, z_drawn.detach(), lpx, k,
                                                available, strata), beta).loss
        (grad,) = torch.autograd.grad(loss, lpx)
    return grad
