"""Training throughput of any recipe (default: DINO ViT-S/16 with 2 x 224 + 8 x 96 crops): the full step (teacher
forward, student forward/backward, clipping, AdamW, EMA update, centres) through ssd's own engine.

    python benchmarks/train_throughput.py --batch-size 64            # per process; GPU: bf16 autocast
    python benchmarks/train_throughput.py --batch-size 8 --device cpu --steps 3
    torchrun --nproc_per_node 8 benchmarks/train_throughput.py --parallel fsdp --recipe dinov2_vit_large14_imagenet
    for recipe in ibot_vit_small16_imagenet dinov2_vit_large14_imagenet dinov3_vit_large16_imagenet; do
        python benchmarks/train_throughput.py --recipe $recipe --batch-size 32; done

Under torchrun each process trains its own --batch-size with DDP or FSDP2 (--parallel), as a run with that many
processes would; rank 0 prints images/s of all processes together and per process, and the largest peak memory.
Input crops are random tensors already on the device, so the number is the model/engine step, not the data
pipeline. With --photometric-on-device the crops come as uint8 pixels with drawn colour parameters (what loader
workers send under crops.photometric_on=device) and every step copies them to the device and applies the colour
steps there, so that cost is in the number. On a GPU it also prints peak memory and model FLOP utilisation (MFU).

FLOPs are counted, not guessed: torch's FlopCounterMode records every matmul / attention of one real step
(forward and backward). As a cross-check, a ViT forward costs about
    2 * tokens * (12 * depth * dim^2)  +  4 * depth * tokens^2 * dim   FLOPs per image
(the 12 d^2 term is qkv + proj + the 4x MLP weights, each multiply-add counted as 2; the second term is the
two attention matmuls), the backward twice the forward, so a DINO step is
    teacher: fwd(2 global)  +  student: 3 * (fwd(2 global) + fwd(8 local))  (+ the small DINO head).
MFU = counted FLOPs per step / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd.config import load_config  # noqa: E402
from ssd.engine import distributed  # noqa: E402
from ssd.engine.trainer import Trainer  # noqa: E402
from ssd.methods import build_method  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, from NVIDIA's data sheets


class _Unused:
    """The engine wants a data set for its loader; the benchmark feeds tensors directly instead."""

    def __len__(self) -> int:
        return 10**7


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def deferred_samples(cfg, count: int) -> list[dict]:
    """Samples as loader workers send them under crops.photometric_on=device: uint8 crops of random scenes and
    their drawn colour parameters."""
    from PIL import Image

    from ssd.train import build_transform

    cfg.crops.photometric_on = "device"
    transform = build_transform(cfg)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(count):
        pixels = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=generator).numpy()
        samples.append({**transform(Image.fromarray(pixels)), "label": 0, "index": index, "epoch": 0})
    return samples


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="dino_vit_small16_imagenet", help="any recipe in ssd/configs")
    parser.add_argument("--batch-size", type=int, default=64, help="images per process per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="train.compile=true: each transformer block compiled on its own")
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                        help="under torchrun: DDP or FSDP2 (train.parallel)")
    parser.add_argument("--photometric-on-device", action="store_true",
                        help="each step includes the copy of uint8 crops and the colour steps on the device")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = parser.parse_args(argv)

    dist_info = distributed.init_distributed(args.device)
    world = dist_info.world_size
    cfg = load_config(args.recipe, [
        "data.root=unused", f"train.batch_size={args.batch_size * world}", f"train.device={args.device}",
        f"train.parallel={args.parallel}",
        f"train.precision={args.precision}", f"train.compile={str(args.compile).lower()}", "data.num_workers=0",
        "train.memory_check=false",  # its probe reads real images; the benchmark feeds tensors
        *args.overrides])
    device = dist_info.device
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_method(cfg), _Unused(), transform=None,
                      dist_info=dist_info, run_dir=Path("/tmp/ssd-benchmark"))
    crops = cfg.crops
    sizes = [crops.global_size] * 2 + [crops.local_size] * crops.local_number + [crops.gram_teacher_size] * (
        2 if crops.gram_teacher_size else 0)
    # Through the method's own collate, so masked methods get their masks (drawn as in training).
    if args.photometric_on_device:
        samples = deferred_samples(cfg, args.batch_size)
    else:
        samples = [{"crops": [torch.randn(3, size, size) for size in sizes], "label": 0, "index": index, "epoch": 0}
                   for index in range(args.batch_size)]
    host_batch = trainer.method.make_collate(cfg.train.seed)(samples)
    if device.type == "cuda":
        host_batch = {key: [crop.pin_memory() for crop in value] if key == "crops" else
                      value.pin_memory() if isinstance(value, torch.Tensor) else value
                      for key, value in host_batch.items()}
    batch = trainer._to_device(host_batch)

    def batches():
        while True:
            yield trainer._to_device(host_batch) if args.photometric_on_device else batch

    stream = batches()
    schedule = trainer.schedule(cfg.optim.warmup_epochs * trainer.steps_per_epoch)  # a post-warmup step
    schedule["freeze_last_layer"] = False
    for _ in range(args.warmup):
        trainer.train_step(stream, schedule)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(stream, schedule)
    flops_per_step = counter.get_total_flops()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(stream, schedule)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    slowest = distributed.all_reduce_max(torch.tensor([seconds], device=device)).item()  # the step waits for it

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": f"{args.recipe} ({cfg.method.name}, {cfg.model.arch}), 2x{crops.global_size} + "
                    f"{crops.local_number}x{crops.local_size} crops, "
                    f"batch {args.batch_size}/process, {world} process(es), "
                    f"{args.parallel if world > 1 else 'one process'}, precision {cfg.train.precision} "
                    f"({trainer.amp_dtype or torch.float32}), compile {args.compile}, colour steps "
                    f"{'on the device, in the step' if args.photometric_on_device else 'not in the step'}",
        "images_per_second": args.batch_size * world / slowest,
        "images_per_second_per_process": args.batch_size / slowest,
        "seconds_per_step": slowest,
        "tflops_per_step": flops_per_step / 1e12,  # one process's share
    }
    if device.type == "cuda":
        peak_bytes = torch.tensor([float(torch.cuda.max_memory_allocated())], device=device)
        result["peak_memory_gib"] = distributed.all_reduce_max(peak_bytes).item() / 2**30
        peak = peak_flops(device)
        if peak:
            result["mfu"] = flops_per_step / slowest / peak
    if dist_info.is_main:
        print(json.dumps(result, indent=2))
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
