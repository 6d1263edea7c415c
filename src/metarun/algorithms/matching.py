"""Matching Networks, with optional Full Context Embeddings."""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.metric import MetricBasedAlgorithm
from metarun.objectives import Objective
from metarun.tasks.types import TaskSplit

# Attention weights are probabilities; their log is the classifier's log-likelihood, kept finite.
_EPS = 1e-8


def cosine_attention(queries: torch.Tensor, support: torch.Tensor, scale: float) -> torch.Tensor:
    """``a(x^, x_i) = softmax_i(scale * cos(f(x^), g(x_i)))`` (Vinyals et al. 2016, eq. 2).

    Args:
        queries: ``[q, D]`` query embeddings ``f(x^)``.
        support: ``[s, D]`` support embeddings ``g(x_i)``.
        scale: multiplies the cosines before the softmax (1 in the paper).

    Returns:
        ``[q, s]`` attention weights; every row sums to 1.
    """
    cosine = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(support, dim=1).T
    return torch.softmax(scale * cosine, dim=1)


class SupportContext(nn.Module):
    """FCE for the support set: ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)`` (Vinyals et al., appendix A.2).

    A bidirectional LSTM reads the support embeddings in order; the sum of its two hidden
    states and a skip connection lets every support embedding depend on the whole set.
    Shapes: ``[s, D] -> [s, D]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, bidirectional=True, batch_first=True)

    def forward(self, support: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(support[None])  # [1, s, 2D]
        forward, backward = out[0].chunk(2, dim=1)
        return forward + backward + support


class QueryContext(nn.Module):
    """FCE for a query: an attention LSTM with ``read_steps`` reads of the support set (Vinyals et al., A.1).

    ``h^_k, c_k = LSTM(f'(x^), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x^)``,
    ``r_k = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)``; the embedding is ``h_K``. The paper
    concatenates ``h`` and ``r`` into the LSTM's state; as in most public implementations, this
    one adds them, which keeps the state size at ``D``. Shapes: ``[q, D], [s, D] -> [q, D]``.
    """

    def __init__(self, dim: int, read_steps: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(dim, dim)
        self.read_steps = read_steps

    def forward(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        h = queries
        c = torch.zeros_like(queries)
        read = torch.zeros_like(queries)
        for _ in range(self.read_steps):
            h_hat, c = self.cell(queries, (h + read, c))
            h = h_hat + queries
            read = torch.softmax(h @ support.T, dim=1) @ support  # [q, D]
        return h


class MatchingClassifier(nn.Module):
    """A task's classifier: ``P(y | x^, S) = sum_i a(x^, x_i) y_i``. ``[q, ...] -> [q, ways]`` log-probabilities."""

    def __init__(self, algorithm: MatchingNet, support: torch.Tensor, one_hot: torch.Tensor) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.support = support  # [s, D] context embeddings g(x_i, S)
        self.one_hot = one_hot  # [s, ways]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``[q, s]`` attention of each query over the support samples."""
        queries = self.algorithm.features(x)
        if self.algorithm.query_context is not None:
            queries = self.algorithm.query_context(queries, self.support)
        return cosine_attention(queries, self.support, self.algorithm.attention_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Log-probabilities already sum to one, so the cross-entropy of the family's score is
        # the paper's negative log-likelihood.
        return torch.log(self.attention(x) @ self.one_hot + _EPS)


class MatchingNet(MetricBasedAlgorithm):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra, "Matching Networks for
    One Shot Learning", NeurIPS 2016).

    A query's label distribution is the attention-weighted sum of the support labels,
    ``P(y | x^, S) = sum_i a(x^, x_i) y_i``, with a softmax over cosine similarities; trained with
    the query's negative log-likelihood. With ``fce`` (Full Context Embeddings), the support
    embeddings pass through a bidirectional LSTM over the support set and each query embedding
    through an attention LSTM that reads the support set ``read_steps`` times.

    Args:
        features: embedding network ``[B, C, H, W] -> [B, D]`` (f' = g', shared as in the paper).
        ways: classes per evaluation task (unused: labels come with the support set).
        fce: use Full Context Embeddings.
        read_steps: the attention LSTM's reads of the support set (K in the paper's appendix).
        attention_scale: multiplies cosine similarities before the softmax (1 in the paper).
        train_ways: classes per training task (unused).
        objective: must be classification.
    """

    def __init__(self, features: nn.Module, ways: int, fce: bool, read_steps: int,
                 attention_scale: float, train_ways: int | None = None,
                 objective: Objective | None = None) -> None:
        super().__init__(objective, "matching")
        self.features = features
        self.attention_scale = attention_scale
        dim = features.out_features
        self.support_context = SupportContext(dim) if fce else None
        self.query_context = QueryContext(dim, read_steps) if fce else None

    def learner(self, support: TaskSplit) -> MatchingClassifier:
        embeddings = self.features(support.x)  # [s, D]
        if self.support_context is not None:
            embeddings = self.support_context(embeddings)
        one_hot = nn.functional.one_hot(support.y, support.ways).to(embeddings.dtype)  # [s, ways]
        return MatchingClassifier(self, embeddings, one_hot)
