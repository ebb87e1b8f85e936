"""A density fitted to the training designs' latents after training, for unconditional generation.

MMVAE+ draws unconditional designs from the fixed priors p(z) p(w_1..M). When the training posteriors do not
fill the prior (their locations spread wider than it, or crowd into part of it), prior draws fall between
the designs the decoders learnt and decode to an average design. The fitted prior instead draws latents
where the training designs' posteriors are: it encodes the train split, takes each design's shared latent
and every component's private latent (its posterior location), joins the design's normalised conditions, and
fits a Gaussian mixture with full covariances to these vectors (one component: a Gaussian). A design for
requested conditions c draws its latents from the mixture's conditional given c, so latents and conditions
keep their joint distribution.

The shared latent is, by ``z_from``, either one expert's location for every component (``best``: the expert
from which whole designs are reconstructed best, ``best_expert``), or each expert's own location, every
component then decoded from its own expert's z (``own``): what each decoder saw with its own private latent
in training. The experts' z differ by what each component's encoder put there of its own (the crown's width,
the bead's size), which one shared z drops. Optionally the fit runs in the leading principal directions of
the latents (``kept_variance``): the experts' locations are strongly correlated, and the mixture's noise in
the weakest directions is what moves one component away from the others. This is a departure from the paper
(an ex-post density estimate, as in Ghosh et al. 2020, "From variational to deterministic autoencoders");
``model.latent_sampler: prior`` keeps the paper's sampler, and the fitted prior only changes unconditional
generation (completions and training are untouched). Decoding each component from its own expert's z departs
further: the paper's unconditional designs share one z (docs/model.md, "Unconditional latents").

It travels in the checkpoint as tensors and plain values (``to_state``), so ``torch.load(weights_only=True)``
reads it.

    >>> import torch
    >>> from epure.model.fitted_prior import FittedPrior
    >>> prior = FittedPrior(torch.ones(1), torch.zeros(1, 3), torch.eye(3)[None], latent_dim=2, designs=100)
    >>> prior.sample(torch.zeros(5, 1)).shape  # latents [N, 2] given one normalised condition column
    torch.Size([5, 2])
    >>> flat = FittedPrior(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None], latent_dim=1, designs=100,
    ...                    basis=torch.tensor([[0.6, 0.8]]), center=torch.tensor([1.0, 2.0]))
    >>> flat.sample(torch.zeros(5, 1)).shape  # one fitted direction, mapped back to two latent dimensions
    torch.Size([5, 2])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

FIT_DESIGNS = 8000  # at most this many training designs (a fixed random subset) are encoded for the fit
EXPERT_DESIGNS = 512  # of them, how many choose the expert whose z is fitted (best_expert)
REG_COVAR = 1e-4  # added to every covariance's diagonal: unused latent dimensions have (almost) no spread
Z_FROM = ("best", "own")  # model.fitted_prior_z: one expert's z for every component, or each component's own


@dataclass
class FittedPrior:
    """A Gaussian mixture over [latents, conditions]; its ``latent_dim`` leading dimensions are latents.

    The latents are [z, w_1, ..., w_M] (one expert's z) or, with ``own_z``, [z_1, ..., z_M, w_1, ..., w_M]; with a
    ``basis`` [P, D] the mixture covers their coordinates along its rows (``latent_dim`` = P), and a draw x maps
    back to ``center`` + x basis."""

    weights: torch.Tensor  # [G]
    means: torch.Tensor  # [G, latent_dim + C]
    covariances: torch.Tensor  # [G, latent_dim + C, latent_dim + C]
    latent_dim: int  # dimensions of the fitted latent part: dz + M dw, M (dz + dw) with own_z, or P with a basis
    designs: int  # how many training designs it was fitted to
    expert: int | None = None  # the component whose expert's z locations were fitted; None: their mean (older fits)
    own_z: bool = False  # every expert's z fitted, each component decoded from its own expert's
    basis: torch.Tensor | None = None  # [P, D] orthonormal rows: the principal directions fitted; None: all of D
    center: torch.Tensor | None = None  # [D] the latents' mean, with a basis

    def __post_init__(self) -> None:
        self.weights, self.means, self.covariances = (t.double() for t in (self.weights, self.means, self.covariances))
        if self.basis is not None:
            self.basis, self.center = self.basis.double(), self.center.double()

    @property
    def output_dim(self) -> int:
        """Width of a drawn latent vector, D (after mapping back from the basis)."""
        return self.latent_dim if self.basis is None else self.basis.shape[1]

    def to_state(self) -> dict:
        empty = torch.zeros(0)
        return {"weights": self.weights.float(), "means": self.means.float(), "covariances": self.covariances.float(),
                "latent_dim": int(self.latent_dim), "designs": int(self.designs),
                "expert": -1 if self.expert is None else int(self.expert), "own_z": int(self.own_z),
                "basis": empty if self.basis is None else self.basis.float(),
                "center": empty if self.center is None else self.center.float()}

    @classmethod
    def from_state(cls, state: dict) -> "FittedPrior":
        """The fit ``to_state`` wrote (also fits saved before ``own_z`` and the basis); ValueError when its shapes
        do not fit together."""
        weights, means, cov = (torch.as_tensor(state[k]) for k in ("weights", "means", "covariances"))
        latent_dim = int(state["latent_dim"])
        g = weights.shape[0] if weights.dim() == 1 else -1
        d = means.shape[-1] if means.dim() == 2 else -1
        if g < 1 or means.shape[0] != g or tuple(cov.shape) != (g, d, d) or not 0 < latent_dim <= d:
            raise ValueError(f"weights {tuple(weights.shape)}, means {tuple(means.shape)} and covariances "
                             f"{tuple(cov.shape)} with {latent_dim} latent dimensions do not fit together")
        basis, center = (torch.as_tensor(state.get(k, torch.zeros(0))) for k in ("basis", "center"))
        if basis.numel() == 0:
            basis = center = None
        elif basis.dim() != 2 or basis.shape[0] != latent_dim or tuple(center.shape) != (basis.shape[1],):
            raise ValueError(f"basis {tuple(basis.shape)} and center {tuple(center.shape)} do not map "
                             f"{latent_dim} fitted dimensions back to the latents")
        expert = int(state.get("expert", -1))
        return cls(weights, means, cov, latent_dim, int(state["designs"]), None if expert < 0 else expert,
                   bool(state.get("own_z", 0)), basis, center)

    def sample(self, conditions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [N, D] drawn given normalised conditions [N, C]: the mixture's conditional at each row (mapped
        back from the basis, if any)."""
        d, n = self.latent_dim, conditions.shape[0]
        device = conditions.device
        mu_l, mu_c = self.means[:, :d], self.means[:, d:]
        s_ll, s_lc, s_cc = self.covariances[:, :d, :d], self.covariances[:, :d, d:], self.covariances[:, d:, d:]
        c = conditions.detach().cpu().double()
        if s_cc.shape[-1]:
            gain = torch.linalg.solve(s_cc, s_lc.transpose(1, 2)).transpose(1, 2)  # S_lc S_cc^-1, [G, D, C]
            cov = s_ll - gain @ s_lc.transpose(1, 2)
            offset = c[:, None] - mu_c[None]  # [N, G, C]
            chol_c = torch.linalg.cholesky(s_cc)
            solved = torch.linalg.solve_triangular(chol_c[None], offset[..., None], upper=False)[..., 0]
            log_norm = -0.5 * (solved**2).sum(-1) - torch.log(torch.diagonal(chol_c, dim1=-2, dim2=-1)).sum(-1)
            logits = torch.log(self.weights)[None] + log_norm  # responsibilities of each mixture component for c
            loc = mu_l[None] + (gain[None] @ offset[..., None])[..., 0]  # [N, G, D]
        else:
            cov, logits = s_ll, torch.log(self.weights)[None].expand(n, -1)
            loc = mu_l[None].expand(n, -1, -1)
        chol = torch.linalg.cholesky(0.5 * (cov + cov.transpose(1, 2)))
        probs = torch.softmax(logits, dim=-1).float().to(device)
        pick = torch.multinomial(probs, 1, generator=generator)[:, 0].cpu()
        noise = torch.randn((n, d), generator=generator, device=device).cpu().double()
        rows = torch.arange(n)
        drawn = loc[rows, pick] + (chol[pick] @ noise[..., None])[..., 0]
        if self.basis is not None:
            drawn = self.center + drawn @ self.basis
        return drawn.float().to(device)


@torch.no_grad()
def design_latents(model, images: torch.Tensor, conditions: torch.Tensor, batch_size: int = 256,
                   expert: int | None = None, own_z: bool = False) -> torch.Tensor:
    """[N, dz + M dw] per design: z, then each component's private latent location. z is the location of
    component ``expert``'s expert, or with None the mixture's mean (the average of the experts' locations);
    with ``own_z`` every expert's z location instead, [N, M dz + M dw]. ``images`` uint8 [N, M, H, W],
    ``conditions`` normalised [N, C]."""
    rows = []
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].float().div_(255)
        post = model.encode(x, model.cond(conditions[start: start + batch_size]))
        if own_z:
            z = post.z_loc.flatten(1)
        else:
            z = post.z_loc.mean(1) if expert is None else post.z_loc[:, expert]
        rows.append(torch.cat([z, post.w_loc.flatten(1)], dim=1).double().cpu())
    return torch.cat(rows)


def principal_basis(latents: np.ndarray, kept_variance: float) -> tuple[np.ndarray, np.ndarray]:
    """(basis [P, D], center [D]): the fewest principal directions of ``latents`` [N, D] whose variance makes up
    at least ``kept_variance`` of the total."""
    center = latents.mean(0)
    _, singular, directions = np.linalg.svd(latents - center, full_matrices=False)
    share = np.cumsum(singular**2) / max(float((singular**2).sum()), 1e-300)
    keep = int(np.searchsorted(share, kept_variance - 1e-12)) + 1
    return directions[: min(keep, len(singular))], center


@torch.no_grad()
def best_expert(model, images: torch.Tensor, conditions: torch.Tensor, designs: int = EXPERT_DESIGNS,
                batch_size: int = 128) -> int:
    """The component whose expert's z location, with every component's own w location, reconstructs whole
    designs best: the largest Bernoulli log-likelihood of all components over the first ``designs`` designs.

    The decoders learnt from single experts' draws of z (the mixture posterior picks one expert per draw),
    never from an average of the experts: their mean lies between them and decodes to a more average design.
    """
    scores = torch.zeros(images.shape[1], dtype=torch.float64)
    for start in range(0, min(designs, len(images)), batch_size):
        x = images[start: min(start + batch_size, designs)].float().div_(255)
        cond_emb = model.cond(conditions[start: start + len(x)])
        post = model.encode(x, cond_emb)
        n, m = x.shape[:2]
        for expert in range(m):
            u = torch.cat([post.w_loc, post.z_loc[:, expert: expert + 1].expand(n, m, -1)], dim=-1)
            logits = model.decode(u, cond_emb).float()
            scores[expert] -= F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
    return int(scores.argmax())


def fit_prior(model, images: torch.Tensor, conditions: torch.Tensor, components: int = 1,
              seed: int = 0, complete: torch.Tensor | None = None, z_from: str = "best",
              kept_variance: float = 1.0) -> FittedPrior | None:
    """Fit the prior to (a fixed subset of at most ``FIT_DESIGNS`` of) the training designs; see the module doc.

    ``complete``: bool [N], the designs that have every component (``data.missing: allow``); only they are
    fitted, since a missing component's latent is no design's. None (no fit, with a warning) when fewer than
    two designs are complete. ``z_from``: ``best`` (one expert's z) or ``own`` (every expert's; ``Z_FROM``).
    ``kept_variance`` < 1: fit only the leading principal directions of the latents that hold that share of
    their variance.
    """
    if z_from not in Z_FROM:
        raise ValueError(f"z_from must be one of {', '.join(Z_FROM)}, got {z_from!r}")
    if complete is not None and not bool(complete.all()):
        rows = torch.nonzero(complete.cpu()).flatten()
        images, conditions = images[rows.to(images.device)], conditions[rows.to(conditions.device)]
    if len(images) < 2:
        log.warning("no fitted prior: %d training design(s) have every component, it needs 2; unconditional "
                    "designs will be drawn from the priors", len(images))
        return None
    if len(images) > FIT_DESIGNS:
        keep = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(images), FIT_DESIGNS, replace=False)))
        images, conditions = images[keep.to(images.device)], conditions[keep.to(conditions.device)]
    was_training = model.training
    model.eval()
    own_z = z_from == "own"
    expert = None if own_z else best_expert(model, images, conditions)
    latents = design_latents(model, images, conditions, expert=expert, own_z=own_z).numpy()
    model.train(was_training)
    basis = center = None
    if kept_variance < 1.0:
        basis, center = principal_basis(latents, kept_variance)
        latents = (latents - center) @ basis.T
    data = np.concatenate([latents, conditions.detach().double().cpu().numpy()], axis=1)
    components = max(1, min(components, len(data) // max(1, data.shape[1])))  # enough designs per covariance
    if components == 1:
        mean = data.mean(0, keepdims=True)
        cov = np.cov(data, rowvar=False)[None] + REG_COVAR * np.eye(data.shape[1])
        weights = np.ones(1)
    else:
        from sklearn.mixture import GaussianMixture

        mixture = GaussianMixture(components, covariance_type="full", reg_covar=REG_COVAR, random_state=seed,
                                  max_iter=200, n_init=1).fit(data)
        weights, mean, cov = mixture.weights_, mixture.means_, mixture.covariances_
    log.info("fitted prior: %d component(s) over %d latent dimensions (%s) and %d conditions, %d designs",
             components, latents.shape[1], "every expert's z" if own_z else f"z from expert {expert}",
             conditions.shape[1], len(data))
    as_tensor = (lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)))
    return FittedPrior(as_tensor(weights), as_tensor(mean), as_tensor(cov), latents.shape[1], len(data), expert,
                       own_z, as_tensor(basis), as_tensor(center))

