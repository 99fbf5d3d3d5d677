"""On-disk cache of extracted features, shared by the k-NN and linear protocols.

A cache file is a safetensors file whose metadata records what made it: the weights (file, size, mtime,
teacher/student), the transform, the data split and the feature kind. Its name carries a hash of that record,
and the record is compared again on reading, so features are reused only for exactly the same inputs; any
other checkpoint or transform extracts afresh into its own file.

For ViTs the cache always stores the ``tokens`` kind (pooled + last-block CLS tokens + patch mean): one pass
serves both protocols.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eval_protocols.features import block_count, extract, has_block_tokens
from ssd.engine.distributed import barrier, rank_and_world

log = logging.getLogger(__name__)
CACHED_BLOCKS = 4  # the linear grid's largest n_last_blocks; fewer are slices of these


def cache_path(cache_dir: str | Path, description: dict) -> Path:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{description['data']['split']}-{digest}.safetensors"


def read_cache(path: Path, description: dict) -> tuple[dict, torch.Tensor, torch.Tensor] | None:
    """The cached ``(outputs, labels, readable)`` if ``path`` was made from exactly ``description``, else None."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        recorded = json.loads((handle.metadata() or {}).get("description", "null"))
        if recorded != json.loads(json.dumps(description)):
            log.warning("feature cache %s was made from %s; not reused for %s", path, recorded, description)
            return None
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    labels = tensors.pop("labels")
    # Caches written before unreadable images were skipped hold no mask: every image in them was read.
    readable = tensors.pop("readable", torch.ones(len(labels), dtype=torch.bool))
    return tensors, labels, readable


def write_cache(path: Path, description: dict, outputs: dict, labels: torch.Tensor, readable: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {**{k: v.contiguous() for k, v in outputs.items()}, "labels": labels, "readable": readable}
    save_file(tensors, temporary, metadata={"description": json.dumps(description, sort_keys=True)})
    os.replace(temporary, path)


def cached_extract(cache_dir, description: dict, backbone, dataset, transform, kind: str = "pooled",
                   n_last_blocks: int = 4, **extract_options) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``features.extract`` through the cache in ``cache_dir`` (None: no cache)."""
    if cache_dir is None:
        return extract(backbone, dataset, transform, kind, n_last_blocks, **extract_options)
    if has_block_tokens(backbone):
        # A shallow test model has fewer blocks than the cache keeps for a real one.
        kind, n_last_blocks = "tokens", max(n_last_blocks, min(CACHED_BLOCKS, block_count(backbone)))
    description = {**description, "kind": kind, "n_last_blocks": n_last_blocks if kind == "tokens" else 0}
    path = cache_path(cache_dir, description)
    cached = read_cache(path, description)
    # A cache that left images out is not used under on_bad_image="fail": extracting again raises, naming them.
    if cached is not None and (cached[2].all() or extract_options.get("on_bad_image", "skip") == "skip"):
        log.info("features read from cache %s (%d unreadable images left out)", path, int((~cached[2]).sum()))
        return cached
    outputs, labels, readable = extract(backbone, dataset, transform, kind, n_last_blocks, **extract_options)
    if rank_and_world()[0] == 0:  # every process holds all features; one writes them
        write_cache(path, description, outputs, labels, readable)
        log.info("features cached in %s", path)
    barrier()
    return outputs, labels, readable
