"""The DINO training step of ssd and of the official implementation on the same machine, side by side.

    git clone https://github.com/facebookresearch/dino /path/to/dino        # nothing official is committed here
    python benchmarks/compare_official.py --official /path/to/dino --batch-size 8 --device cpu --steps 3
    python benchmarks/compare_official.py --official /path/to/dino --batch-size 64        # GPU

Both run the recipe of the official ViT-S/16 command (2 x 224 + 8 x 96 crops, 65536 prototypes, no BN in the head,
normalised last layer, drop path 0.1, AdamW, clip 3.0, EMA teacher) on the same random crops already on the
device, so the figure is the model/engine step, not the data pipeline (benchmarks/data_throughput.py times
that). The official step is train_one_epoch's body from `main_dino.py`, calling the checkout's own modules
(vision_transformer, DINOHead, MultiCropWrapper, DINOLoss, utils.clip_gradients, get_params_groups) on one
process (its DDP wrapper left out; its loss all-reduces the centre, so a one-process gloo group is started).
Precision: fp32 on CPU; on a GPU the official default, fp16 autocast with a GradScaler, against ssd's default,
bf16 autocast. ssd's step is benchmarks/train_throughput.py's (the engine's own `train_step`).

Rounds alternate between the two (ssd, official, ssd, ...) so that a machine's drift affects both; the medians
are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput  # noqa: E402

OUT_DIM, LOCAL_CROPS = 65536, 8


def official_step(official: Path, batch_size: int, device: torch.device):
    """A function running one official DINO training step, and a description of it."""
    sys.path.insert(0, str(official))
    import main_dino  # the checkout's own code
    import utils as dino_utils
    import vision_transformer as vits

    if not dist.is_initialized():  # DINOLoss.update_center all-reduces
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    student = dino_utils.MultiCropWrapper(vits.vit_small(patch_size=16, drop_path_rate=0.1),
                                          vits.DINOHead(384, OUT_DIM, use_bn=False, norm_last_layer=True)).to(device)
    teacher = dino_utils.MultiCropWrapper(vits.vit_small(patch_size=16),
                                          vits.DINOHead(384, OUT_DIM, False)).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = main_dino.DINOLoss(OUT_DIM, LOCAL_CROPS + 2, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(dino_utils.get_params_groups(student))
    for group in optimizer.param_groups:
        group["lr"] = 5e-4 * batch_size / 256
    use_fp16 = device.type == "cuda"  # the official default (--use_fp16 true) where it applies
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(batch_size, 3, size, size, generator=generator).to(device)
              for size in [224] * 2 + [96] * LOCAL_CROPS]

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_fp16):
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = loss_fn(student_output, teacher_output, 1)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            dino_utils.clip_gradients(student, 3.0)
            dino_utils.cancel_gradients_last_layer(1, student, 1)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            dino_utils.clip_gradients(student, 3.0)
            dino_utils.cancel_gradients_last_layer(1, student, 1)
            scaler.step(optimizer)
            scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(0.996).add_((1 - 0.996) * param_q.detach().data)
        return loss

    return step, f"official DINO ({official}), {'fp16 autocast' if use_fp16 else 'fp32'}"


def time_official(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="a checkout of github.com/facebookresearch/dino")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each implementation")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    official = Path(args.official).expanduser().resolve()
    if not (official / "main_dino.py").is_file():
        raise SystemExit(f"--official {official} holds no main_dino.py: give a checkout of facebookresearch/dino")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    step, official_settings = official_step(official, args.batch_size, device)
    ours, theirs, settings = [], [], ""
    for _ in range(args.rounds):
        result = train_throughput.main(["--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                        "--warmup", str(args.warmup), "--device", device.type])
        ours.append(result["seconds_per_step"])
        settings = result["settings"]
        theirs.append(time_official(step, args.steps, args.warmup, device))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": train_throughput.machine(),
        "batch_size": args.batch_size,
        "ssd": {"settings": settings, "images_per_second": args.batch_size / statistics.median(ours),
                "seconds_per_step": [round(s, 4) for s in ours]},
        "official": {"settings": official_settings,
                     "images_per_second": args.batch_size / statistics.median(theirs),
                     "seconds_per_step": [round(s, 4) for s in theirs]},
    }
    report["ssd_over_official"] = report["ssd"]["images_per_second"] / report["official"]["images_per_second"]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
