"""k-NN search time: FAISS exact inner-product index versus chunked torch.mm + topk (the official DINO way).

    python benchmarks/knn_throughput.py                        # banks of 50k, 200k, 1M features, dim 384
    python benchmarks/knn_throughput.py --max-bank 200000      # skip the larger banks

Random L2-normalised features stand in for real ones: an exact search costs the same whatever the values.
Prints the machine, the settings and one row per (bank, device, method) in a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from eval_protocols.search import build_faiss_index, faiss, faiss_gpu_available, faiss_search, torch_search  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    lines = [f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"cpu: {cpu_name()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
             f"load average at start {os.getloadavg()[0]:.1f} (other jobs share the cores when > 0)",
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"faiss {getattr(faiss, '__version__', 'missing')}"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}, faiss gpu support: {faiss_gpu_available()}")
    else:
        lines.append("gpu: none")
    return "\n".join(lines)


def random_features(count: int, dim: int, seed: int) -> torch.Tensor:
    features = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(features, dim=1)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_faiss(bank, queries, k, device, batch_size) -> tuple[float, float, torch.Tensor]:
    started = time.perf_counter()
    index = build_faiss_index(bank, "flat", use_gpu=device == "cuda")
    built = time.perf_counter()
    _, indices = faiss_search(index, queries, k, batch_size)
    return built - started, time.perf_counter() - built, indices


def time_torch(bank, queries, k, device, chunk) -> tuple[float, float, torch.Tensor]:
    synchronize(device)
    started = time.perf_counter()
    _, indices = torch_search(bank, queries, k, batch_size=chunk, device=device)
    synchronize(device)
    return 0.0, time.perf_counter() - started, indices


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--banks", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--max-bank", type=int, default=None, help="skip banks larger than this")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384, help="ViT-S/16 feature size")
    parser.add_argument("--k", type=int, default=200, help="the largest k of the DINO protocol")
    parser.add_argument("--faiss-batch", type=int, default=4096, help="queries per FAISS search call")
    parser.add_argument("--torch-chunk", type=int, default=100,
                        help="queries per torch.mm (DINO: 1/100 of the test set, 100 for 10k queries)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: all available)")
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    banks = [b for b in args.banks if args.max_bank is None or b <= args.max_bank]

    print(machine())
    print(f"settings: {args.queries} queries, dim {args.dim}, k {args.k}, banks {banks}, devices {devices}, "
          f"faiss query batch {args.faiss_batch}, torch chunk {args.torch_chunk}")
    print("\n| bank | device | method | build s | search s | queries/s | same neighbours as torch |")
    print("|---:|---|---|---:|---:|---:|---:|")
    queries = random_features(args.queries, args.dim, seed=1)
    for bank_size in banks:
        bank = random_features(bank_size, args.dim, seed=0)
        for device in devices:
            reference = None
            for method in ("torch", "faiss"):
                if method == "faiss" and device == "cuda" and not faiss_gpu_available():
                    print(f"| {bank_size} | cuda | faiss | - | - | - | FAISS has no GPU support here |")
                    continue
                timer = time_torch if method == "torch" else time_faiss
                batch = args.torch_chunk if method == "torch" else args.faiss_batch
                build, search, indices = timer(bank, queries, args.k, device, batch)
                if reference is None:
                    reference = indices
                # Float rounding can swap near-equal neighbours; compare the sets of the first 10.
                overlap = (indices[:, :10, None] == reference[:, None, :10]).any(-1).float().mean().item()
                print(f"| {bank_size} | {device} | {method} | {build:.2f} | {search:.2f} | "
                      f"{args.queries / search:,.0f} | {100 * overlap:.1f}% |", flush=True)
        del bank


if __name__ == "__main__":
    main()
