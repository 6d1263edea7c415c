"""The metric-based family: exact maths against NumPy, its invariants, and learning checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metarun.algorithms.matching import MatchingNet, cosine_attention
from metarun.algorithms.metric import class_means
from metarun.algorithms.protonet import ProtoNet, prototype_logits
from metarun.algorithms.relation import RelationNet
from metarun.algorithms.siamese import SiameseNet, balanced_pairs
from metarun.backbones import MLP, Conv4
from metarun.errors import ConfigError
from metarun.objectives import Regression
from metarun.tasks.types import TaskSplit


class Flat(torch.nn.Flatten):
    """A 'backbone' whose features are the inputs themselves (``[n, D] -> [n, D]``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_features = dim


def split(x: np.ndarray, y: list[int], ways: int) -> TaskSplit:
    return TaskSplit(torch.tensor(x, dtype=torch.float64), torch.tensor(y), ways)


# ---------------------------------------------------------------------------------------------
# Prototypical Networks
# ---------------------------------------------------------------------------------------------


def test_prototypes_and_distances_match_numpy():
    rng = np.random.default_rng(0)
    ways, shots, dim = 3, 4, 5
    xs = rng.normal(size=(ways * shots, dim))
    ys = rng.permutation(np.repeat(np.arange(ways), shots))
    xq = rng.normal(size=(7, dim))
    prototypes = np.stack([xs[ys == k].mean(0) for k in range(ways)])
    sq_dist = ((xq[:, None, :] - prototypes[None]) ** 2).sum(-1)
    cosine = (xq / np.linalg.norm(xq, axis=1, keepdims=True)) @ (
        prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)).T

    support = split(xs, ys.tolist(), ways)
    assert np.allclose(class_means(support.x, support.y, ways).numpy(), prototypes, atol=1e-12)
    protonet = ProtoNet(Flat(dim), ways=ways, distance="euclidean", cosine_scale=10.0)
    learner = protonet.adapt(support, steps=0)
    assert np.allclose(learner(torch.tensor(xq)).numpy(), -sq_dist, atol=1e-10)
    logits = prototype_logits(torch.tensor(xq), torch.tensor(prototypes), "cosine", cosine_scale=3.0)
    assert np.allclose(logits.numpy(), 3.0 * cosine, atol=1e-10)


def test_protonet_loss_is_cross_entropy_of_negative_squared_distances():
    rng = np.random.default_rng(1)
    xs, xq = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    ys, yq = [0, 1, 0, 1], [1, 0, 0, 1]
    protos = np.stack([xs[[0, 2]].mean(0), xs[[1, 3]].mean(0)])
    logits = -((xq[:, None] - protos[None]) ** 2).sum(-1)
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -log_softmax[np.arange(4), yq].mean()
    protonet = ProtoNet(Flat(3), ways=2, distance="euclidean", cosine_scale=10.0)
    result = protonet.score(protonet.adapt(split(xs, ys, 2), 0), split(xq, yq, 2))
    assert float(result.loss) == pytest.approx(expected, abs=1e-10)
    assert float(result.accuracy) == pytest.approx(np.mean(logits.argmax(1) == np.array(yq)))


def test_unknown_distance_is_one_clear_error():
    with pytest.raises(ConfigError, match="euclidean, cosine"):
        ProtoNet(Flat(3), ways=2, distance="manhattan", cosine_scale=10.0)


@pytest.mark.parametrize("cls,options", [
    (ProtoNet, {"distance": "euclidean", "cosine_scale": 10.0}),
    (MatchingNet, {"fce": False, "read_steps": 1, "attention_scale": 1.0}),
    (RelationNet, {"filters": 8, "hidden": 8, "padding": 1}),
    (SiameseNet, {"embedding_dim": None}),
], ids=lambda p: getattr(p, "__name__", ""))
def test_metric_methods_refuse_regression(cls, options):
    with pytest.raises(ConfigError, match="needs a classification dataset.*algorithm=maml"):
        cls(MLP(in_features=4, hidden=[8]), ways=2, objective=Regression(), **options)


# ---------------------------------------------------------------------------------------------
# Matching Networks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fce", [False, True])
def test_matching_attention_weights_sum_to_one_and_give_the_label_distribution(fce):
    torch.manual_seed(0)
    net = MatchingNet(MLP(in_features=16, hidden=[12]), ways=3, fce=fce, read_steps=3, attention_scale=1.0).double()
    support = TaskSplit(torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    query = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    learner = net.adapt(support, steps=0)
    attention = learner.attention(query)  # [5, 6]
    assert attention.shape == (5, 6) and bool((attention >= 0).all())
    assert torch.allclose(attention.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    # P(y = k | x^) is the attention mass on support samples of class k, summing to 1 over classes.
    probabilities = learner(query).exp()
    expected = torch.stack([attention[:, [k, k + 3]].sum(1) for k in range(3)], dim=1)
    assert torch.allclose(probabilities, expected, atol=1e-7)


def test_cosine_attention_matches_numpy():
    rng = np.random.default_rng(2)
    q, s = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (s / np.linalg.norm(s, axis=1, keepdims=True)).T
    expected = np.exp(2 * cos) / np.exp(2 * cos).sum(1, keepdims=True)
    assert np.allclose(cosine_attention(torch.tensor(q), torch.tensor(s), 2.0).numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Relation Network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shots", [1, 3])
def test_relation_scores_lie_in_unit_interval_and_sum_support_maps(shots):
    torch.manual_seed(0)
    net = RelationNet(Conv4(1, 8, 28, "max", False, pooled_blocks=2, pooled_padding=0), ways=4, filters=64, hidden=8,
                      padding=1)
    labels = torch.arange(4).repeat(shots)
    support = TaskSplit(torch.rand(4 * shots, 1, 28, 28), labels, 4)
    learner = net.adapt(support, steps=0)
    maps = net.features.feature_maps(support.x)
    assert torch.allclose(learner.class_maps[1], maps[labels == 1].sum(0), atol=1e-5)  # K-shot: summed
    scores = learner(torch.rand(6, 1, 28, 28))
    assert scores.shape == (6, 4)
    assert bool(((scores >= 0) & (scores <= 1)).all())


# ---------------------------------------------------------------------------------------------
# Siamese Networks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ways,shots,query_shots", [(2, 1, 1), (5, 1, 3), (20, 1, 1), (5, 5, 2)])
def test_siamese_pairs_are_balanced_and_correctly_labelled(ways, shots, query_shots):
    generator = torch.Generator().manual_seed(ways * shots)
    support_y = torch.arange(ways).repeat(shots)[torch.randperm(ways * shots, generator=generator)]
    query_y = torch.arange(ways).repeat_interleave(query_shots)
    qi, si, same = balanced_pairs(query_y, support_y, ways)
    assert len(qi) == 2 * len(query_y) * shots
    assert int(same.sum()) == len(same) // 2, "exactly half the pairs are same-class"
    assert torch.equal(same.bool(), query_y[qi] == support_y[si]), "the labels say whether the classes match"
    positives = {(int(q), int(s)) for q, s, m in zip(qi, si, same, strict=True) if m}
    assert len(positives) == len(query_y) * shots, "every query meets every support sample of its class"
    if ways > 2:
        negatives = support_y[si[same == 0]]
        assert len(set(negatives.tolist())) > 1, "negatives cover more than one class"


def test_siamese_similarity_is_the_weighted_l1_distance():
    net = SiameseNet(Flat(3), ways=2, embedding_dim=None).double()
    with torch.no_grad():
        net.distance_weights.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        net.distance_weights.bias.fill_(0.25)
    a = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 2.0]], dtype=torch.float64)
    expected = [1.0 * 1 - 2.0 * 0 + 0.5 * 2 + 0.25, 1.0 * 0 - 2.0 * 2 + 0.5 * 0 + 0.25]
    assert net.similarity(a, b)[0].tolist() == pytest.approx(expected)


def test_siamese_classifies_a_query_by_its_most_similar_support_image():
    net = SiameseNet(Flat(2), ways=2, embedding_dim=None).double()
    with torch.no_grad():
        net.distance_weights.weight.fill_(-1.0)  # closer = more similar
        net.distance_weights.bias.zero_()
    support = split(np.array([[0.0, 0.0], [5.0, 5.0], [0.2, 0.1], [4.0, 5.0]]), [1, 0, 1, 0], 2)
    query = split(np.array([[0.1, 0.0], [5.0, 4.5], [4.9, 5.1]]), [1, 0, 0], 2)
    result = net.score(net.adapt(support, 0), query)
    assert float(result.accuracy) == 1.0


# ---------------------------------------------------------------------------------------------
# Learning checks
# ---------------------------------------------------------------------------------------------

LEARNING_RUN = ["iterations=100", "meta_batch_size=8", "eval_every=50", "eval.val_tasks=30",
                "eval.tasks=100"]


def trained_and_untrained(compose_cfg, tmp_path, *overrides: str) -> tuple[float, float]:
    """Test accuracy after a short run, and of the same network before training, on the same test tasks."""
    from metarun.build import build_algorithm, build_data, seed_everything
    from metarun.loop import run, score_tasks

    cfg = compose_cfg(*LEARNING_RUN, *overrides)
    run(cfg, tmp_path)
    trained = json.loads((tmp_path / "results.json").read_text())["test/acc_mean"]
    seed_everything(cfg.seed)
    _, _, test_tasks, objective = build_data(cfg, torch.device("cpu"))
    algorithm, _, _ = build_algorithm(cfg, torch.device("cpu"), objective)
    untrained = score_tasks(algorithm, test_tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z).score("acc")
    return trained, untrained


@pytest.mark.parametrize("algorithm,overrides", [
    ("protonet", []),
    ("matching", []),
    ("matching_fce", []),
    ("relation", ["backbone=conv4_relation"]),
    # Koch et al. train on large batches of pairs: more query samples per task give more pairs.
    ("siamese", ["train_query_shots=5", "algorithm.embedding_dim=null"]),
])
def test_metric_methods_learn_glyphs(compose_cfg, tmp_path, algorithm, overrides):
    trained, untrained = trained_and_untrained(compose_cfg, tmp_path, "dataset=glyphs", f"algorithm={algorithm}",
                                               *overrides)
    assert trained > untrained + 0.15, f"{algorithm}: {untrained:.3f} before training, {trained:.3f} after"
    assert trained > 0.2 + 0.35  # 5-way chance is 0.2


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("algorithm,overrides,floor", [
    ("protonet", ["train_ways=10", "train_query_shots=5"], 0.9),
    # The paper's unscaled cosine attention learns slowly (docs/results.md): 0.78 and 0.79 measured.
    ("matching", ["train_query_shots=5"], 0.7),
    ("matching_fce", ["train_query_shots=5"], 0.7),
    ("relation", ["backbone=conv4_relation", "train_query_shots=5"], 0.8),
    ("siamese", ["train_query_shots=5", "algorithm.embedding_dim=null"], 0.7),
])
def test_metric_methods_learn_real_omniglot_5w1s(compose_cfg, tmp_path, omniglot_root, algorithm, overrides, floor):
    trained, untrained = trained_and_untrained(
        compose_cfg, tmp_path, "dataset=omniglot", f"dataset.root={omniglot_root}", f"algorithm={algorithm}",
        "iterations=300", "eval_every=100", *overrides,
    )
    assert trained > untrained + 0.1, f"{algorithm}: {untrained:.3f} before training, {trained:.3f} after"
    assert trained > floor, f"{algorithm}: {trained:.3f} after 300 iterations on Omniglot 5-way 1-shot"


def test_relation_pairs_put_the_class_maps_first_as_the_authors_code():
    """Each pair is [class maps, query maps] along the channels, scored for every (query, class)."""
    torch.manual_seed(0)
    net = RelationNet(Conv4(1, 4, 28, "max", False, pooled_blocks=2, pooled_padding=0), ways=3, filters=64, hidden=8,
                      padding=1)
    net.eval()
    seen = []
    net.relation.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    support = TaskSplit(torch.rand(3, 1, 28, 28), torch.tensor([2, 0, 1]), 3)
    learner = net.adapt(support, steps=0)
    queries = torch.rand(2, 1, 28, 28)
    learner(queries)
    pairs = seen[0].view(2, 3, 8, 5, 5)  # [q, ways, 2C, h, w]
    class_maps = net.features.feature_maps(support.x)[torch.tensor([1, 2, 0])]  # ordered by label
    query_maps = net.features.feature_maps(queries)
    assert torch.allclose(pairs[:, :, :4], class_maps[None].expand(2, -1, -1, -1, -1), atol=1e-6)
    assert torch.allclose(pairs[:, :, 4:], query_maps[:, None].expand(-1, 3, -1, -1, -1), atol=1e-6)


def test_siamese_needs_two_ways():
    with pytest.raises(ConfigError, match="at least 2 ways"):
        SiameseNet(Flat(3), ways=1, embedding_dim=None)
