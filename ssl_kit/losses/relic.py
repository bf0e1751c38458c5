"""ReLICv2 loss: contrastive likelihood of the positive plus a KL invariance term.

Tomasev et al., "Pushing the limits of self-supervised ResNets", 2022 (arXiv:2201.05119).

With ``phi(a, b) = cos(a, b) / tau`` between online anchors ``x_i`` and target candidates:

- ``log p(x_i; x_j) = log_softmax_j phi(x_i, x_j)`` over the positive and the negatives of
  ``x_i`` (a row of the similarity matrix);
- ``log p(x_j; x_i)``: the same pair seen from the target ``x_j`` as anchor, i.e. the softmax
  over the online embeddings that ``x_j`` is compared with (a column of the matrix);
- loss per anchor ``-alpha * log p(x_i; x_i+) + beta * KL`` with
  ``KL = sg[sum_j p(x_i; x_j) log p(x_i; x_j)] - sum_j p(x_i; x_j) log p(x_j; x_i)``.

The functions are pure: a caller under DDP passes the global batch (online embeddings gathered
with gradients, target embeddings gathered without) and the ``rows`` this process owns; the mean
of the per-process losses is then the single-process loss of the same global batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.errors import UserError


def relic_loss(
    online: Tensor,
    target: Tensor,
    temperature: float = 0.1,
    alpha: float = 1.0,
    beta: float = 1.0,
    rows: tuple[int, int] | None = None,
    candidates: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ReLICv2 loss of one (online view, target view) pair, averaged over the anchors in ``rows``.

    Row ``i`` of ``online`` and of ``target`` come from the same image (the positive pair); the
    other rows of ``target`` are the negatives. ``target`` gets a stop-gradient. Computed in fp32.

    Args:
        online: online embeddings of every image in the (global) batch; need not be normalised.
        target: target embeddings of the same images in the same order.
        temperature: tau in ``phi = cos / tau``.
        alpha: weight of the contrastive term.
        beta: weight of the KL invariance term.
        rows: ``(start, stop)`` anchors scored here (a process's slice of the global batch);
            default all.
        candidates: ``candidates[i, j]`` True when target ``j`` is compared with anchor ``i``
            (sampled negatives); the diagonal must be True. Default: all pairs.

    Returns:
        ``(loss, contrastive, invariance)``: ``loss = alpha * contrastive + beta * invariance``,
        each the mean over the anchors in ``rows``.

    Shapes:
        online, target: (N, D); candidates: (N, N) bool -> three scalars.
    """
    z = F.normalize(online.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    logits = z @ t.T / temperature  # (N, N): anchors x candidates
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    start, stop = rows if rows is not None else (0, logits.shape[0])
    log_p = logits[start:stop].log_softmax(dim=1)  # (n, N): log p(x_i; x_j)
    log_p_rev = logits.log_softmax(dim=0)[start:stop]  # (n, N): log p(x_j; x_i)
    if candidates is not None:  # 0 * -inf would be nan: excluded pairs carry no mass
        keep = candidates[start:stop]
        log_p_safe, log_p_rev = log_p.masked_fill(~keep, 0.0), log_p_rev.masked_fill(~keep, 0.0)
    else:
        log_p_safe = log_p
    p = log_p.exp()
    positives = torch.arange(start, stop, device=logits.device)
    contrastive = -log_p[positives - start, positives].mean()
    neg_entropy = (p * log_p_safe).sum(dim=1).detach()  # the paper's sg[...] side
    invariance = (neg_entropy - (p * log_p_rev).sum(dim=1)).mean()
    return alpha * contrastive + beta * invariance, contrastive, invariance


def relicv2_loss(
    online_views: Sequence[Tensor],
    target_views: Sequence[Tensor],
    temperature: float = 0.1,
    alpha: float = 1.0,
    beta: float = 1.0,
    rows: tuple[int, int] | None = None,
    candidates: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-crop ReLICv2 loss: :func:`relic_loss` summed over every (online view, target view)
    pair and divided by the number of pairs, ``(n_large + n_small) * n_large``.

    Args:
        online_views: online embeddings of the large crops then the small crops.
        target_views: target embeddings of the large crops.
        temperature, alpha, beta, rows, candidates: see :func:`relic_loss`.

    Returns:
        ``(loss, contrastive, invariance)`` averaged over pairs.

    Shapes:
        online_views: V_o x (N, D); target_views: V_t x (N, D) -> three scalars.
    """
    if not target_views:
        raise ValueError("relicv2_loss needs at least one target (large) view.")
    totals = [0.0, 0.0, 0.0]
    for online in online_views:
        for target in target_views:
            terms = relic_loss(online, target, temperature, alpha, beta, rows, candidates)
            totals = [a + b for a, b in zip(totals, terms)]
    pairs = len(online_views) * len(target_views)
    return tuple(x / pairs for x in totals)  # type: ignore[return-value]


def sample_candidates(n: int, num_negatives: int, generator: torch.Generator | None, device=None) -> Tensor:
    """For each anchor, its positive plus ``num_negatives`` others drawn uniformly without
    replacement. Seed ``generator`` identically on every process so all share the same draw.

    Shapes:
        returns (N, N) bool with a True diagonal and ``num_negatives + 1`` True per row.
    """
    if not 1 <= num_negatives <= n - 1:
        raise UserError(f"num_negatives={num_negatives} is not allowed with a global batch of {n}: "
                         f"use 1 <= num_negatives <= {n - 1}, or null for every other image.")
    where = generator.device if generator is not None else device  # None: the global RNG, on `device`
    scores = torch.rand(n, n, generator=generator, device=where)
    scores.fill_diagonal_(2.0)  # the positive always ranks first
    picked = scores.topk(num_negatives + 1, dim=1).indices  # (N, n_e + 1)
    mask = torch.zeros(n, n, dtype=torch.bool, device=where).scatter_(1, picked, True)
    return mask.to(device) if device is not None else mask
