"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO's protocol)."""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_kit.errors import UserError


def knn_search(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact cosine-similarity top-k with faiss (inner product on L2-normalised features).

    Shapes:
        bank: (N, D); queries: (M, D) -> similarities (M, k) descending, indices (M, k)
    """
    if k > bank.shape[0]:
        raise UserError(f"k={k} is larger than the training set ({bank.shape[0]} features); use k <= {bank.shape[0]}.")
    bank = F.normalize(bank.float(), dim=1).numpy()
    queries = F.normalize(queries.float(), dim=1).numpy()
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(bank))
    sims, idx = index.search(np.ascontiguousarray(queries), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def knn_vote(sims: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores from neighbours weighted by ``exp(sim / T)``.

    Shapes:
        sims, neighbour_labels: (M, k) -> scores (M, num_classes)
    """
    weights = (sims / temperature).exp()  # (M, k)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_predict(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None,
) -> Tensor:
    """Class scores of each query from its k nearest bank features.

    Shapes:
        bank: (N, D); bank_labels: (N,); queries: (M, D) -> (M, num_classes)
    """
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    sims, idx = knn_search(bank, queries, k)
    return knn_vote(sims, bank_labels[idx], num_classes, temperature)


def check_ks(ks: Sequence[int], num_bank: int) -> list[int]:
    """Validate neighbour counts against the bank size; returns them sorted and de-duplicated."""
    if not ks:
        raise UserError("k must list at least one neighbour count, e.g. [10, 20, 100, 200].")
    bad = [k for k in ks if k < 1]
    if bad:
        raise UserError(f"k={bad} is not allowed: every k must be >= 1.")
    too_large = [k for k in ks if k > num_bank]
    if too_large:
        raise UserError(f"k={too_large} is larger than the training set ({num_bank} images); use k <= {num_bank}.")
    return sorted(set(int(k) for k in ks))


def knn_accuracies(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, num_classes: int | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of weighted k-NN for several k, from a single search
    with the largest k (faiss returns neighbours sorted, so each k is a prefix).

    Shapes:
        bank: (N, D); bank_labels: (N,); queries: (M, D); query_labels: (M,)
    """
    ks = check_ks(ks, bank.shape[0])
    if temperature <= 0:
        raise UserError(f"temperature={temperature} is not allowed: it must be > 0.")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    sims, idx = knn_search(bank, queries, max(ks))  # (M, max k)
    neighbour_labels = bank_labels[idx]  # (M, max k)
    results = {}
    for k in ks:
        scores = knn_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)  # (M, C)
        topk = scores.topk(min(5, num_classes), dim=1).indices  # (M, 5)
        hits = topk == query_labels[:, None]
        results[k] = {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item()}
    return results


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of weighted k-NN."""
    return knn_accuracies(bank, bank_labels, queries, query_labels, [k], temperature)[k]
