"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

For each query feature q (L2-normalised) and the labelled memory bank X (L2-normalised):

    s_j = <q, x_j>,  N_k(q) = the k largest s_j,
    score(c) = sum_{j in N_k(q), y_j = c} exp(s_j / T),   prediction = argmax_c score(c)

with k = 20 and 200 and T = 0.07 by default; top-1 and top-5 accuracies
(top-5: the label among the 5 best-scoring classes). A class that got no
vote is never counted as predicted (with fewer than 5 voted classes, top-5
does not count the arbitrary order of the zero scores).

Memory: the (queries x bank) similarity matrix is never built whole. Queries
go in chunks of `query_chunk` rows and the bank in chunks of `bank_chunk`
columns; a running top-k (values, indices) is merged chunk by chunk. Peak
extra memory is query_chunk x (bank_chunk + k) similarities: for 50k queries
against 1.28M features that is 1024 x 262144 x 4 B = 1 GiB at the defaults.

Several ranks: every rank holds the whole bank (features are gathered after
extraction) and classifies the queries i = rank, rank + world, ...; the
correct counts are summed over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastmoco.distributed import get_rank, get_world_size

KS = (20, 200)
TEMPERATURE = 0.07
TOP5 = 5
QUERY_CHUNK = 1024
BANK_CHUNK = 262144


@torch.no_grad()
def topk_similarities(queries: torch.Tensor, bank: torch.Tensor, k: int, *,
                      bank_chunk: int = BANK_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) largest cosine similarities of each query against the bank, descending, and the bank
    indices they belong to. `queries` and `bank` already L2-normalised, fp32."""
    k = min(k, bank.shape[0])
    best_v = best_i = None
    for start in range(0, bank.shape[0], bank_chunk):
        sims = queries @ bank[start:start + bank_chunk].T                      # (Q, chunk)
        v, i = sims.topk(min(k, sims.shape[1]), dim=1)
        i += start
        if best_v is not None:
            v, pos = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
            i = torch.cat([best_i, i], 1).gather(1, pos)
        best_v, best_i = v, i
    return best_v, best_i


@torch.no_grad()
def weighted_votes(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                   temperature: float) -> torch.Tensor:
    """(Q, num_classes) vote of the given neighbours: sum of exp(sim / T) per class."""
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=torch.float32)
    return scores.scatter_add_(1, neighbour_labels, (sims / temperature).exp())


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, *, ks=KS, temperature: float = TEMPERATURE,
                 num_classes: int | None = None, query_chunk: int = QUERY_CHUNK,
                 bank_chunk: int = BANK_CHUNK, distributed: bool = True) -> dict[int, tuple[float, float]]:
    """{k: (top-1 %, top-5 %)} of the weighted kNN classifier. Features (n, C) of any float dtype on
    any device (computed in fp32 there); labels int64 (n,). With `distributed` and several ranks,
    every rank passes the same bank and queries and does 1/world of the queries."""
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError(f"kNN needs a non-empty bank and query set, got {bank.shape[0]} and {queries.shape[0]}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank features of width {bank.shape[1]}, queries of width {queries.shape[1]}")
    ks = sorted({int(k) for k in ks})
    if ks[0] < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device, torch.int64)
    rank, world = (get_rank(), get_world_size()) if distributed else (0, 1)
    mine = torch.arange(rank, queries.shape[0], world, device=queries.device)
    correct = torch.zeros(len(ks), 2, dtype=torch.float64, device=bank.device)  # (k, top-1/top-5)
    top = min(TOP5, num_classes)
    for start in range(0, mine.numel(), query_chunk):
        idx = mine[start:start + query_chunk]
        q = F.normalize(queries[idx].to(bank.device).float(), dim=1)
        target = query_labels[idx].to(bank.device, torch.int64)[:, None]                 # (q, 1)
        sims, nn_idx = topk_similarities(q, bank, ks[-1], bank_chunk=bank_chunk)        # (q, kmax)
        nn_labels = bank_labels[nn_idx]
        for j, k in enumerate(ks):
            scores = weighted_votes(sims[:, :k], nn_labels[:, :k], num_classes, temperature)
            pred = scores.topk(top, dim=1).indices                                      # (q, top)
            voted = scores.gather(1, target) > 0   # a class without votes is never "predicted"
            correct[j, 0] += ((pred[:, :1] == target) & voted).sum()
            correct[j, 1] += ((pred == target).any(1, keepdim=True) & voted).sum()
    if distributed and world > 1:
        dist.all_reduce(correct)
    pct = (correct * 100.0 / queries.shape[0]).tolist()
    return {k: (pct[j][0], pct[j][1]) for j, k in enumerate(ks)}


def format_knn(results: dict[int, tuple[float, float]]) -> str:
    return ", ".join(f"k={k}: top-1 {t1:.2f}% top-5 {t5:.2f}%" for k, (t1, t5) in results.items())
