"""k-NN protocol: the weighted vote against a brute-force float64 reference, the FAISS and torch search paths,
and a real run on CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_protocols.knn import knn_classify, weighted_vote
from eval_protocols.search import topk_search


def reference_scores(train, train_labels, test, k, temperature, num_classes):
    """Per-query class scores, one query at a time, in float64: the DINO vote written out plainly."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for q, query in enumerate(test):
        similarities = train @ query
        for neighbour in similarities.argsort(descending=True)[:k]:
            scores[q, train_labels[neighbour]] += torch.exp(similarities[neighbour] / temperature)
    return scores


def reference_accuracy(scores, labels, top):
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
    return 100.0 * (ranking == labels[:, None]).any(dim=1).double().mean().item()


@pytest.fixture
def random_bank():
    generator = torch.Generator().manual_seed(0)
    num_classes = 7
    centres = torch.randn(num_classes, 16, generator=generator)
    train_labels = torch.randint(num_classes, (300,), generator=generator)
    test_labels = torch.randint(num_classes, (60,), generator=generator)
    # Overlapping clusters: accuracies land strictly between chance and 100%, so errors in the vote show.
    train = centres[train_labels] + 1.5 * torch.randn(300, 16, generator=generator)
    test = centres[test_labels] + 1.5 * torch.randn(60, 16, generator=generator)
    return train, train_labels, test, test_labels, num_classes


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_matches_brute_force_reference(random_bank, backend):
    train, train_labels, test, test_labels, num_classes = random_bank
    ks = (1, 5, 20, 100)
    results = knn_classify(train, train_labels, test, test_labels, ks=ks, temperature=0.07,
                           num_classes=num_classes, backend=backend, batch_size=16)
    assert set(results) == {f"k={k}" for k in ks}
    for k in ks:
        scores = reference_scores(train, train_labels, test, k, 0.07, num_classes)
        assert results[f"k={k}"]["top1"] == pytest.approx(reference_accuracy(scores, test_labels, 1))
        assert results[f"k={k}"]["top5"] == pytest.approx(reference_accuracy(scores, test_labels, 5))
    accuracies = [r["top1"] for r in results.values()]
    assert 100 / num_classes < max(accuracies) < 100  # a meaningful, not a degenerate, case


def test_weighted_vote_scores_match_reference(random_bank):
    train, train_labels, test, test_labels, num_classes = random_bank
    normalise = torch.nn.functional.normalize
    similarities, indices = topk_search(normalise(train), normalise(test), 20, backend="torch")
    scores = weighted_vote(similarities, train_labels[indices], num_classes, temperature=0.1)
    expected = reference_scores(train, train_labels, test, 20, 0.1, num_classes)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_faiss_and_torch_search_agree(random_bank):
    train, _, test, _, _ = random_bank
    bank, queries = torch.nn.functional.normalize(train), torch.nn.functional.normalize(test)
    sims_faiss, idx_faiss = topk_search(bank, queries, 10, backend="faiss", batch_size=7)
    sims_torch, idx_torch = topk_search(bank, queries, 10, backend="torch", batch_size=7)
    torch.testing.assert_close(sims_faiss, sims_torch, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx_faiss, idx_torch)


def test_approximate_indexes_give_nearly_exact_accuracy():
    generator = torch.Generator().manual_seed(1)
    # Clustered, labelled like real features (uniform noise is the worst case of an inverted-file index).
    centres = torch.randn(20, 32, generator=generator)
    train_labels = torch.randint(20, (5000,), generator=generator)
    test_labels = torch.randint(20, (300,), generator=generator)
    train = centres[train_labels] + 1.5 * torch.randn(5000, 32, generator=generator)
    test = centres[test_labels] + 1.5 * torch.randn(300, 32, generator=generator)
    exact = knn_classify(train, train_labels, test, test_labels, ks=(20,), backend="torch")["k=20"]["top1"]
    for index_type in ("ivf", "ivfpq"):
        # pq_m=2 (16-d sub-vectors): PQ training costs ~1 s per sub-quantizer on 2 CPU cores.
        approximate = knn_classify(train, train_labels, test, test_labels, ks=(20,), index_type=index_type,
                                   nlist=32, nprobe=8, pq_m=2)["k=20"]["top1"]
        assert abs(approximate - exact) < 5, (index_type, approximate, exact)
    assert 30 < exact < 99, exact


def test_k_larger_than_bank_is_clamped():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_labels = torch.tensor([0, 0, 1])
    test, test_labels = torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1])
    results = knn_classify(train, train_labels, test, test_labels, ks=(1, 2, 20, 200))
    assert results["k=1"] == {"top1": 100.0, "top5": 100.0}
    # With all 3 neighbours voting, the two class-0 points outvote the class-1 point for the second query
    # only if weights were uniform; exp(sim / 0.07) makes the nearest point dominate.
    assert results["k=200"]["top1"] == 100.0


def test_search_rejects_unknown_options(random_bank):
    train, train_labels, test, test_labels, _ = random_bank
    with pytest.raises(ValueError, match="backend"):
        knn_classify(train, train_labels, test, test_labels, backend="annoy")
    with pytest.raises(ValueError, match="needs backend='faiss'"):
        knn_classify(train, train_labels, test, test_labels, backend="torch", index_type="ivf")


def _raw_pixels(dataset, count, generator):
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    images, labels = zip(*(dataset.load(i) for i in indices))
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32).ravel() for image in images]))
    return pixels, torch.tensor(labels)


def test_knn_on_cifar10_raw_pixels(cifar10_root):
    from ssd.data import CIFAR10Dataset

    generator = torch.Generator().manual_seed(0)
    train, train_labels = _raw_pixels(CIFAR10Dataset(cifar10_root, "train"), 5000, generator)
    test, test_labels = _raw_pixels(CIFAR10Dataset(cifar10_root, "test"), 1000, generator)
    mean = train.mean(dim=0)  # centred pixels: cosine similarity then compares contrast, not brightness
    results = knn_classify(train - mean, train_labels, test - mean, test_labels)
    # Measured: 37-38% top-1 for k in {10, 20, 100} (chance is 10%). A vote picking the wrong neighbours or the
    # wrong labels falls near or below 10%.
    for k in ("k=10", "k=20", "k=100"):
        assert 30 < results[k]["top1"] < 48, results
        assert 70 < results[k]["top5"] < 92, results
    shuffled = knn_classify(train - mean, train_labels[torch.randperm(5000, generator=generator)],
                            test - mean, test_labels, ks=(20,))
    assert shuffled["k=20"]["top1"] < 16
