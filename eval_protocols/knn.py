"""Weighted k-NN classification of frozen features, the protocol of the DINO paper.

Features are L2-normalised so that inner products are cosine similarities; each test feature's k nearest
training features vote for their label with weight ``exp(similarity / T)`` (T = 0.07); top-1 and top-5
accuracies are reported for several k from one search with the largest k.

    python -m eval_protocols.knn checkpoints/my_run --dataset imagefolder --data-root /data/imagenet \\
        --test-split val --baselines --output knn.json

--baselines adds the same architecture at random initialisation and raw pixels (the table the end of a
training run prints); --limit 200 makes it a smoke test of seconds. The JSON layout is that of a run's knn.json
(see eval_protocols/reports.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from eval_protocols import common, reports
from eval_protocols.search import BACKENDS, INDEX_TYPES, l2_normalize, topk_search
from ssd.cli import run_command

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 100, 200)


def weighted_vote(
    similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores (Q, C): each neighbour adds ``exp(sim / T)`` to its class. Inputs are (Q, k)."""
    weights = (similarities.float() / temperature).exp()
    scores = torch.zeros(len(similarities), num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbor_labels.long(), weights)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, top: int) -> torch.Tensor:
    """Whether each label is among the ``top`` best-scored classes (Q,). Ties go to the lower class index
    (a stable sort), so the result does not depend on the hardware."""
    ranking = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
    return (ranking == labels.view(-1, 1)).any(dim=1)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks=DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    index_type: str = "flat",
    batch_size: int = 4096,
    **index_options,
) -> dict:
    """Top-1 / top-5 accuracy (percent) of the weighted k-NN vote, per k: ``{"k=20": {"top1": .., "top5": ..}}``.

    Features are (N, D) tensors (normalised here); labels (N,) integers. A k larger than the training bank is
    clamped to the bank size. ``backend`` / ``index_type`` / ``index_options`` go to ``search.topk_search``.
    """
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), len(train_features))
    if k_max < max(ks):
        log.warning("k clamped to the bank size %d (asked for up to %d)", k_max, max(ks))
    similarities, indices = topk_search(
        l2_normalize(train_features), l2_normalize(test_features), k_max,
        backend=backend, index_type=index_type, batch_size=batch_size, **index_options,
    )
    neighbor_labels = train_labels[indices]  # (Q, k_max), sorted by decreasing similarity

    results = {}
    top5 = min(5, num_classes)
    for k in ks:
        k_used = min(k, k_max)
        correct1 = correct5 = 0
        # Votes go in chunks of queries: a (Q, C) score matrix for 50k queries x 1000 classes is 200 MB.
        for start in range(0, len(test_labels), batch_size):
            stop = start + batch_size
            scores = weighted_vote(similarities[start:stop, :k_used], neighbor_labels[start:stop, :k_used],
                                   num_classes, temperature)
            correct1 += topk_correct(scores, test_labels[start:stop], 1).sum().item()
            correct5 += topk_correct(scores, test_labels[start:stop], top5).sum().item()
        results[f"k={k}"] = {"top1": 100.0 * correct1 / len(test_labels), "top5": 100.0 * correct5 / len(test_labels)}
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval_protocols.knn", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    common.add_model_args(parser)
    common.add_data_args(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="numbers of neighbours")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="faiss (GPU when available) or torch (chunked mm + topk, as in DINO); auto: faiss "
                             "when installed")
    parser.add_argument("--index", choices=INDEX_TYPES, default="flat",
                        help="flat = exact; ivf / ivfpq = approximate, for banks too large for memory")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: ~4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query")
    parser.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers (default: D / 8)")
    common.add_report_args(parser, seeded="the --limit / --fraction subset and the random-init baseline")
    args = parser.parse_args(argv)
    common.check_data_args(parser, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common.init_distributed()
    backbone, model_info = common.load_backbone(args)
    datasets = {"train": common.build_split(args, args.train_split), "test": common.build_split(args, args.test_split)}
    index_options = {"nprobe": args.nprobe, "nlist": args.nlist, "pq_m": args.pq_m} if args.index != "flat" else {}
    results, seconds, skipped, sizes = {}, {}, None, {}
    for name, model, identity in common.candidates(args, backbone, model_info):
        started = time.perf_counter()
        # Extraction is collective (every process takes a shard); the search runs on the main process.
        (train_features, train_labels, train_readable), (test_features, test_labels, test_readable) = (
            common.features_for_split(args, model, model_info, datasets[part], split, "pooled", identity=identity)
            for part, split in (("train", args.train_split), ("test", args.test_split)))
        extracted = time.perf_counter()
        if not common.is_main_process():
            continue
        if skipped is None:  # the same images for every candidate: counted (and said) once
            skipped = {"train": common.count_left_out(train_readable, args.train_split),
                       "test": common.count_left_out(test_readable, args.test_split)}
        train_features, train_labels = train_features[train_readable], train_labels[train_readable]
        test_features, test_labels = test_features[test_readable], test_labels[test_readable]
        sizes = {"train_size": len(train_labels), "test_size": len(test_labels)}
        results[name] = knn_classify(train_features, train_labels, test_features, test_labels, ks=args.ks,
                                     temperature=args.temperature, backend=args.backend, index_type=args.index,
                                     **index_options)
        seconds[name] = {"features": round(extracted - started, 3),
                         "search": round(time.perf_counter() - extracted, 3)}
    if not common.is_main_process():
        return {}
    report = reports.knn_json(common.report_header(args, model_info, "knn", datasets), **sizes,
                              skipped_images=skipped, ks=args.ks, temperature=args.temperature,
                              search={"backend": args.backend, "index": args.index, **index_options},
                              results=results, seconds=seconds)
    print(reports.knn_table(report))
    if args.output:
        common.write_json(args.output, report)
        print(f"results written to {args.output}")
    return report


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
