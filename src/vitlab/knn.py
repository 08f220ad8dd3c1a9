"""Weighted k-nearest-neighbour classification of features (Wu et al. 2018), as DINO and Walmer et
al. use it to measure how semantic a representation is.

Shared by the layer probes (:mod:`vitlab.analysis.probes`) and the pretraining objectives' k-NN
monitor (:mod:`vitlab.train.objectives`), so both report the same statistic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict"]


def knn_predict(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Weighted k-NN classes of unit-norm ``queries`` against a unit-norm ``bank`` (Wu et al. 2018):
    each query's ``k`` most similar bank features vote for their labels with weight
    ``exp(similarity / temperature)``."""
    sims, idx = (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], num_classes).scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
    return votes.argmax(1)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Weighted cosine k-NN accuracy (Wu et al. 2018, as DINO and Walmer et al. use it): every query's
    ``k`` most similar bank features vote for their labels with weight ``exp(similarity / temperature)``."""
    if not len(bank) or not len(queries):
        return float("nan")
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    predicted = knn_predict(queries, bank, bank_labels, classes, k, temperature)
    return (predicted == query_labels).float().mean().item()
