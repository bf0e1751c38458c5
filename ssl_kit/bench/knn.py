"""k-NN search wall time: faiss (exact, ``IndexFlatIP``) vs brute-force torch, same results.

    python -m ssl_kit.bench.knn --bank 100000 --queries 10000 --dim 768 --k 200

Clustered random features (``classes`` Gaussian centroids plus noise) stand in for an encoder's;
both searches see the same L2-normalised tensors. Prints the wall time of each, the share of
identical neighbour lists and the k-NN top-1 of each (they must match).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import Tensor

from ssl_kit.bench.timer import Span
from ssl_kit.evaluators.knn import knn_search, knn_vote


def clustered_features(n: int, dim: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` features around ``classes`` random centroids, with their labels.

    Shapes:
        returns features (n, dim) and labels (n,)
    """
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))  # shared by bank and queries
    labels = torch.randint(0, classes, (n,), generator=g)
    return centroids[labels] + 6.0 * torch.randn(n, dim, generator=g), labels


def torch_search(bank: Tensor, queries: Tensor, k: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Brute force: cosine similarity matrix in query chunks, then ``topk``.

    Shapes:
        bank: (N, D); queries: (M, D) -> similarities (M, k), indices (M, k)
    """
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        top = (queries[start : start + chunk] @ bank.T).topk(k, dim=1)  # (chunk, k)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def top1(sims: Tensor, idx: Tensor, bank_labels: Tensor, query_labels: Tensor, classes: int) -> float:
    pred = knn_vote(sims, bank_labels[idx], classes, 0.07).argmax(1)  # (M,)
    return 100.0 * (pred == query_labels).float().mean().item()


def main(bank: int = 100_000, queries: int = 10_000, dim: int = 768, k: int = 200, classes: int = 100,
         threads: int | None = None) -> None:
    """Time faiss and torch exact k-NN search on the same features.

    Args:
        bank: training features (the searched set).
        queries: query features.
        dim: feature width (768: ViT-B).
        k: neighbours.
        classes: clusters / labels of the synthetic features.
        threads: CPU threads for both (default: torch's setting).
    """
    if threads:
        import faiss

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    bank_x, bank_y = clustered_features(bank, dim, classes, seed=1)
    query_x, query_y = clustered_features(queries, dim, classes, seed=2)
    rows = []
    for name, search in (("faiss IndexFlatIP", knn_search), ("torch matmul+topk", torch_search)):
        with Span() as span:  # one call each, no warm-up: at the default size a search takes minutes
            sims, idx = search(bank_x, query_x, k)
        rows.append((name, span.seconds.wall, sims, idx))
    (_, _, sims_f, idx_f), (_, _, sims_t, idx_t) = rows
    same = (idx_f == idx_t).all(1).float().mean().item() * 100
    print(f"k-NN search: bank {bank} x {dim}, {queries} queries, k={k}, {torch.get_num_threads()} torch threads")
    for name, seconds, sims, idx in rows:
        print(f"  {name:<20} {seconds:8.2f} s   top-1 {top1(sims, idx, bank_y, query_y, classes):6.2f}")
    print(f"  identical neighbour lists: {same:.2f}% of queries; "
          f"max |similarity difference| {(sims_f - sims_t).abs().max().item():.2e}")


if __name__ == "__main__":
    CLI(main)
