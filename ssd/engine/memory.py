"""Will this run fit? Memory is measured before the first step, so a recipe too large for the machine says so at
once (with the batch that fits) instead of being killed by the kernel's OOM killer minutes later, with nothing
but "Killed" in the log.

The estimate comes from a real training step of the method at two tiny micro-batches (2 and 4 images), so it
holds for any method, backbone, head and crop setting without a per-architecture formula:

    need(micro-batch B) = per_image * B + fixed + optimizer state + data loader

- On CUDA, per_image and fixed are the allocator's peak above the weights (exact, includes gradients and
  temporaries). On CPU there is no allocator counter, so the step counts the bytes autograd keeps for backward
  (activations, softmax outputs, masks; weights excluded) plus one copy of the gradients: the dominant terms.
- The optimizer state (AdamW: two fp32 moments per trainable weight) is allocated at the first step.
- Each data-loader worker holds prefetched batches of float crops plus its own process overhead.

The probe steps run on a copy of the method under a forked RNG, so a run with the check is bitwise equal to one
without it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from ssd.engine.machine import available_host_bytes

log = logging.getLogger("ssd")

GIB = 2**30
PROBE_SIZES = (2, 4)  # micro-batches of the probe; 2 is the smallest that BatchNorm accepts everywhere
WORKER_OVERHEAD_BYTES = 250 * 2**20  # private memory of a forked loader worker with torch imported (measured)
PREFETCH_FACTOR = 2  # torch DataLoader's default: batches in flight per worker
# On CPU the counted bytes (saved activations + one copy of the gradients) came to 0.76-0.88 of the measured
# peak (benchmarks/memory_estimate.py, recorded in benchmarks/RESULTS.md): backward's temporary gradients of
# activations and the allocator's slack make up the rest.
CPU_STEP_FACTOR = 1.2
REFUSE_ABOVE = 0.95  # of the available memory: the estimate leaves out allocator slack and fragmentation
WARN_ABOVE = 0.80


@dataclass
class MemoryEstimate:
    device: str  # "cpu" or "cuda"
    micro_batch: int
    processes: int  # processes that share this pool (on CPU: every process on the node)
    per_image: float  # bytes per image of a micro-batch
    fixed: float  # bytes independent of the batch: gradients, temporaries, optimizer state
    loader_per_image: float  # host bytes per image of a micro-batch, all workers together
    loader_fixed: float  # host bytes of the workers themselves
    available: float  # bytes free for this run in the pool
    host_available: float  # bytes free in host memory (the loader's pool)

    def device_need(self, micro_batch: int) -> float:
        """Bytes of the pool the training step lives in, for all processes sharing it."""
        need = self.fixed + self.per_image * micro_batch
        if self.device == "cpu":
            need += self.loader_fixed + self.loader_per_image * micro_batch
        return need * self.processes

    def host_need(self, micro_batch: int) -> float:
        return (self.loader_fixed + self.loader_per_image * micro_batch) * self.processes

    @property
    def share(self) -> float:
        """The largest fraction of a pool (device, host) this run would use."""
        shares = [self.device_need(self.micro_batch) / max(self.available, 1.0)]
        if self.device != "cpu":
            shares.append(self.host_need(self.micro_batch) / max(self.host_available, 1.0))
        return max(shares)

    def largest_micro_batch(self, limit: float = REFUSE_ABOVE * 0.9) -> int:
        """The largest micro-batch whose need stays under `limit` of every pool (0: not even one image)."""
        best = 0
        for batch in range(1, self.micro_batch + 1):
            if self.device_need(batch) > limit * self.available:
                break
            if self.device != "cpu" and self.host_need(batch) > limit * self.host_available:
                break
            best = batch
        return best

    def describe(self) -> str:
        pool = "host memory" if self.device == "cpu" else "GPU memory"
        who = f" for {self.processes} processes" if self.processes > 1 else ""
        return (f"memory estimate: {self.device_need(self.micro_batch) / GIB:.1f} GiB of {pool}{who} at micro-batch "
                f"{self.micro_batch} ({self.per_image * self.micro_batch / GIB:.1f} GiB activations, "
                f"{self.fixed / GIB:.1f} GiB gradients and optimizer state, "
                f"{self.host_need(self.micro_batch) / GIB:.1f} GiB data loader); "
                f"{self.available / GIB:.1f} GiB available")


class _SavedBytes:
    """Bytes autograd keeps for backward, each storage counted once, the weights themselves left out."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen, self.total = exclude, set(), 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.exclude and pointer not in self.seen:
            self.seen.add(pointer)
            self.total += storage.nbytes()
        return tensor


def _step_bytes(method, batch: dict, device: torch.device, amp_dtype, schedule: dict) -> float:
    """Bytes one forward + backward of `batch` needs above what is already allocated."""
    trainable = [p for p in method.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = _SavedBytes({p.untyped_storage().data_ptr() for p in method.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = method(batch, schedule)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - base
    else:
        used = CPU_STEP_FACTOR * (counter.total + sum(p.numel() * p.element_size() for p in trainable))
    for param in trainable:
        param.grad = None
    return float(used)


def measure(method, make_batch, micro_batch: int, device: torch.device, amp_dtype, schedule: dict,
            workers: int, processes: int, shards: int = 1) -> MemoryEstimate:
    """Run the probe steps; `make_batch(n)` gives a device batch of n images (the real crops and collate).

    `shards` > 1 (train.parallel=fsdp over that many processes): each process keeps 1/shards of the gradients
    and of the optimizer state; the probe, which runs the unsharded copy, counted one whole copy of the
    gradients, so (1 - 1/shards) of it is taken off."""
    # The probe steps run on a copy: whatever a method keeps between forward and after_step (collected
    # teacher logits, BatchNorm statistics, gradients) stays in the copy, so training starts untouched.
    probe = copy.deepcopy(method).train()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            samples = {size: make_batch(size) for size in PROBE_SIZES}
            used = {size: _step_bytes(probe, samples[size], device, amp_dtype, schedule) for size in PROBE_SIZES}
    finally:
        del probe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    small, large = PROBE_SIZES
    per_image = max(used[large] - used[small], 0.0) / (large - small)
    trainable_bytes = sum(p.numel() * 4 for p in method.parameters() if p.requires_grad)  # fp32
    step_fixed = max(used[small] - per_image * small - trainable_bytes * (1 - 1 / shards), 0.0)
    optimizer_state = 2 * trainable_bytes / shards  # AdamW's two moments
    crop_bytes = sum(crop[0].numel() * 4 for crop in samples[small]["crops"])  # float32 crops of one image
    loader_per_image = crop_bytes * PREFETCH_FACTOR * max(workers, 1) * (2 if device.type == "cuda" else 1)
    host = available_host_bytes()
    available = host if device.type == "cpu" else float(torch.cuda.mem_get_info(device)[0])
    return MemoryEstimate(
        device=device.type, micro_batch=micro_batch, processes=processes if device.type == "cpu" else 1,
        per_image=per_image, fixed=step_fixed + optimizer_state, loader_per_image=loader_per_image,
        loader_fixed=WORKER_OVERHEAD_BYTES * workers, available=available, host_available=host,
    )


def refusal(estimate: MemoryEstimate, cfg, world_size: int) -> str:
    """What to tell a user whose run does not fit: the numbers and the settings that would fit."""
    fits = estimate.largest_micro_batch()
    message = f"this run does not fit: {estimate.describe()}. "
    if fits == 0:
        return message + ("Not even one image per step fits: use a smaller model, smaller crops "
                          "(crops.global_size, crops.local_number) or a machine with more memory; "
                          "train.memory_check=false starts anyway.")
    per_process = cfg.train.batch_size // world_size
    accum = next(a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= fits)
    return message + (f"A micro-batch of up to {fits} images per process fits: set train.grad_accum_steps={accum} "
                      f"(same global batch {cfg.train.batch_size}, {per_process // accum} images per forward), or "
                      f"lower train.batch_size to {fits * world_size}; "
                      "train.memory_check=false starts anyway.")


def probe_out_of_memory_refusal(error: str) -> str:
    """What to tell a user whose probe step (2 images) already ran out of device memory."""
    return (f"this run does not fit: the memory check's probe step of {PROBE_SIZES[0]} images ran out of device "
            f"memory ({error}). Use a smaller model or smaller crops (crops.global_size, crops.local_number), "
            "model.grad_checkpointing=true, or train.parallel=fsdp over several GPUs; train.memory_check=false "
            "starts anyway.")
