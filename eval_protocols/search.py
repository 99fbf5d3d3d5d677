"""Top-k inner-product search of queries against a feature bank.

Two back ends with one contract, ``(similarities (Q, k), indices (Q, k))`` sorted by decreasing similarity:

- FAISS (default): an exact ``IndexFlatIP`` (on GPU when both CUDA and FAISS GPU support are present), or an
  approximate IVF / IVF-PQ index for banks that do not fit in memory as float32.
- torch: a chunked ``torch.mm`` + ``topk``, which is how the official DINO code searches; kept as the
  reference and for the benchmark.

Queries go in batches in both, so memory stays bounded whatever the number of queries.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

try:  # FAISS is a listed dependency, but the torch path keeps k-NN usable where its wheel is missing.
    # faiss's loader logs at INFO which CPU builds it tried (and failed) to load: noise in every command's output.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    import faiss
except ImportError:  # pragma: no cover - exercised only on machines without faiss
    faiss = None

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfpq")
BACKENDS = ("auto", "faiss", "torch")


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, as float32: inner products become cosine similarities."""
    return F.normalize(features.float(), dim=1)


def faiss_gpu_available() -> bool:
    return (
        faiss is not None
        and torch.cuda.is_available()
        and hasattr(faiss, "StandardGpuResources")
        and faiss.get_num_gpus() > 0
    )


def _as_numpy(features: torch.Tensor) -> np.ndarray:
    # FAISS wants C-contiguous float32; on CPU this shares memory with the tensor when it already is.
    return np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())


def default_nlist(num_bank: int) -> int:
    # ~4 sqrt(N) lists is the usual FAISS rule of thumb; each list needs ~39 training points for its k-means.
    return max(1, min(int(4 * math.sqrt(num_bank)), num_bank // 39))


def _index_spec(index_type: str, dim: int, nlist: int, pq_m: int | None) -> str:
    if index_type == "flat":
        return "Flat"
    if index_type == "ivf":
        return f"IVF{nlist},Flat"
    if index_type == "ivfpq":
        pq_m = pq_m or dim // 8  # 8 dims per 1-byte code: a 384-d float32 vector shrinks from 1536 B to 48 B
        if not pq_m or dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the feature dimension {dim}; pass --pq-m with a divisor")
        return f"IVF{nlist},PQ{pq_m}"
    raise ValueError(f"unknown index type {index_type!r}; expected one of {INDEX_TYPES}")


def build_faiss_index(
    bank: torch.Tensor,
    index_type: str = "flat",
    use_gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int = 32,
    pq_m: int | None = None,
    add_batch_size: int = 65536,
    seed: int = 0,
):
    """A FAISS inner-product index holding ``bank`` (N, D), ready to search."""
    if faiss is None:
        raise RuntimeError("faiss is not installed; `pip install faiss-gpu` (or faiss-cpu), or use backend='torch'")
    num_bank, dim = bank.shape
    nlist = nlist or default_nlist(num_bank)
    index = faiss.index_factory(dim, _index_spec(index_type, dim, nlist, pq_m), faiss.METRIC_INNER_PRODUCT)
    use_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
    if use_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, torch.cuda.current_device(), index)
        index.referenced_resources = resources  # keep the GPU memory pool alive as long as the index
    if not index.is_trained:
        # k-means on a seeded sample: training on the whole of a 1M bank costs time and buys nothing.
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(num_bank, generator=generator)[: max(256 * nlist, 10_000)]
        index.train(_as_numpy(bank[sample]))
    for start in range(0, num_bank, add_batch_size):  # converting chunk by chunk bounds the float32 copy
        index.add(_as_numpy(bank[start:start + add_batch_size]))
    if index_type != "flat":
        if use_gpu:
            index.nprobe = nprobe
        else:
            faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def faiss_search(index, queries: torch.Tensor, k: int, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    similarities, indices = [], []
    for start in range(0, len(queries), batch_size):
        sims, idx = index.search(_as_numpy(queries[start:start + batch_size]), k)
        similarities.append(torch.from_numpy(sims))
        indices.append(torch.from_numpy(idx).long())
    return torch.cat(similarities), torch.cat(indices)


@torch.no_grad()
def torch_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, batch_size: int = 4096, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search by chunked matrix product, as the official DINO ``knn_classifier`` does it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bank_t = bank.to(device, torch.float32).t()  # (D, N)
    similarities, indices = [], []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size].to(device, torch.float32)
        sims, idx = torch.mm(chunk, bank_t).topk(k, dim=1, largest=True, sorted=True)
        similarities.append(sims.cpu())
        indices.append(idx.cpu())
    return torch.cat(similarities), torch.cat(indices)


def topk_search(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    backend: str = "auto",
    index_type: str = "flat",
    batch_size: int = 4096,
    **index_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query with the bank: ``(sims (Q, k), indices (Q, k))``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; expected one of {BACKENDS}")
    if k > len(bank):
        raise ValueError(f"k={k} is larger than the bank ({len(bank)} features)")
    if backend == "auto":
        backend = "faiss" if faiss is not None else "torch"
    if backend == "torch":
        if index_type != "flat":
            raise ValueError(f"index_type={index_type!r} needs backend='faiss'; the torch backend is exact only")
        return torch_search(bank, queries, k, batch_size)
    index = build_faiss_index(bank, index_type=index_type, **index_options)
    sims, idx = faiss_search(index, queries, k, batch_size)
    if (idx < 0).any():  # an IVF search probing too few lists can come back short of k neighbours
        raise RuntimeError(f"FAISS returned fewer than k={k} neighbours for some queries; raise nprobe")
    return sims, idx
