"""Every GPU measurement the open issues ask for, in parts that each fit one call of a lent GPU (10 minutes).

    python benchmarks/gpu_session.py prepare      # here, no device time: wheels the device image lacks, the
                                                  # official DINO checkout; both in git-ignored folders
    python benchmarks/gpu_session.py check        # on the GPU: device colour steps against the CPU, timed; short
                                                  # bf16 training runs of each method from the command line
    python benchmarks/gpu_session.py throughput   # on the GPU: train_throughput for each method's recipe, plain,
                                                  # packed crops, compiled blocks, colour steps in the step, and
                                                  # DDP / FSDP2 over all GPUs where more than one is lent
    python benchmarks/gpu_session.py official     # on the GPU: compare_official, DINO ViT-S/16 at batch 64
    python benchmarks/gpu_session.py cifar        # on the GPU: up to 9.5 minutes of dino_cifar10_vit_small
                                                  # (issue 12: 90% k-NN in 30 minutes); it saves at SIGTERM, and
                                                  # the next call resumes it while the machine stays warm

On the device tool: run(command="python3 benchmarks/gpu_session.py throughput", carry=[".whl", ".official"]);
the cifar part also carries ".data" (the shared CIFAR-10 zip, 63 MB: carry it alone with .whl, the limit is 64 MiB).
The device image has PyTorch, torchvision, timm, safetensors and PyYAML but not omegaconf: the wheels carried in
.whl are installed into /tmp/site first. Each part writes its raw output under $OUT (benchmarks/gpu-out without
one) and ends with a markdown table for benchmarks/RESULTS.md. `--dry-run` runs a part on the CPU with tiny
steps, to check this script on a machine without a GPU (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS, OFFICIAL, DATA = REPO / ".whl", REPO / ".official" / "dino", REPO / ".data"
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"
CARRIED_WHEELS = ("omegaconf==2.4.0",)  # the device image holds everything else ssd's training imports
OUT = Path(os.environ.get("OUT") or REPO / "benchmarks" / "gpu-out")

# (recipe, batch per GPU): each method's ImageNet recipe at a batch that fills an H200 without activation
# checkpointing for the small models and leaves room for the large ones.
RECIPES = (("dino_vit_small16_imagenet", 64), ("ibot_vit_small16_imagenet", 64), ("dinov2_vit_small14_imagenet", 64),
           ("dinov2_vit_large14_imagenet", 32), ("dinov3_vit_large16_imagenet", 32), ("ijepa_vit_base16_imagenet", 64))
VARIANTS = {"plain": [], "packed": ["model.packed_crops=true"], "compiled": ["--compile"],
            "colour on device": ["--photometric-on-device"]}
DEMOS = ("dino_digits_demo", "ibot_digits_demo", "dinov2_digits_demo", "ijepa_digits_demo", "dino_random_teacher_digits_demo")


def python_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    site = "/tmp/site"
    if WHEELS.is_dir() and not Path(site).is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", site, *map(str, WHEELS.glob("*.whl"))], check=True)
    if Path(site).is_dir():
        env["PYTHONPATH"] = os.pathsep.join([site, str(REPO), env.get("PYTHONPATH", "")])
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_json(command: list[str], log_name: str, env: dict, timeout: float) -> dict:
    """Run a benchmark script, keep its whole output under OUT, return the JSON object it printed last."""
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, output, code = result.stdout, result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:
        stdout, output, code = "", f"{expired.stdout!r}\n{expired.stderr!r}\ntimed out after {timeout} s", -1
    (OUT / log_name).write_text(output)
    lines = stdout.splitlines() if code == 0 else []
    starts = [index for index, line in enumerate(lines) if line.startswith("{")]
    report = json.loads("\n".join(lines[starts[-1]:])) if starts else {}
    report["exit"], report["wall_s"] = code, round(time.monotonic() - started, 1)
    return report


def prepare() -> None:
    WHEELS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(WHEELS), *CARRIED_WHEELS], check=True)
    if not (OFFICIAL / "main_dino.py").is_file():
        source = os.environ.get("DINO_CHECKOUT")
        if not source:
            raise SystemExit("set DINO_CHECKOUT=<a clone of github.com/facebookresearch/dino> to copy it into "
                             f"{OFFICIAL} (git-ignored; nothing official is committed)")
        shutil.copytree(source, OFFICIAL, ignore=shutil.ignore_patterns(".git"))
    if SHARED_CIFAR.is_file() and not (DATA / SHARED_CIFAR.name).is_file():
        DATA.mkdir(exist_ok=True)
        shutil.copy(SHARED_CIFAR, DATA / SHARED_CIFAR.name)
    print(f"ready: {sorted(path.name for path in WHEELS.glob('*.whl'))}, {OFFICIAL}, "
          f"{sorted(path.name for path in DATA.glob('*.zip'))}")


def check(env: dict, dry_run: bool) -> None:
    code = ("import json, torch, time\n"
            "from ssd.data.deferred_photometric import apply_photometric\n"
            "from ssd.data import MultiCropAugmentation\n"
            "from PIL import Image\n"
            "g = torch.Generator().manual_seed(0)\n"
            "aug = MultiCropAugmentation(photometric_on='device')\n"
            "views = [aug(Image.fromarray(torch.randint(0, 256, (375, 500, 3), generator=g, dtype=torch.uint8)"
            ".numpy())) for _ in range(64)]\n"
            "crops = [torch.stack([v['crops'][i] for v in views]) for i in range(10)]\n"
            "params = torch.stack([v['photometric'] for v in views], dim=1)\n"
            "device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')\n"
            "reference = apply_photometric(crops, params)\n"
            "moved = [c.to(device) for c in crops]\n"
            "for _ in range(3): out = apply_photometric(moved, params)\n"
            "sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)\n"
            "sync(); start = time.perf_counter()\n"
            "for _ in range(20): out = apply_photometric(moved, params)\n"
            "sync(); ms = (time.perf_counter() - start) / 20 * 1000\n"
            "error = max(float((a.cpu() - b).abs().max()) for a, b in zip(out, reference))\n"
            "print(json.dumps({'device': str(device), 'max_abs_diff_vs_cpu': error, 'ms_per_batch_of_64': ms}))\n")
    report = run_json([sys.executable, "-c", code], "colour_steps.log", env, timeout=300)
    print(f"colour steps on the device, batch 64 (2 x 224 + 8 x 96): {report}")
    rows = ["| demo recipe | exit | final loss | images/s | wall s |", "|---|---|---|---|---|"]
    steps = 5 if dry_run else 200
    for recipe in DEMOS:
        run_dir = f"/tmp/ssd-gpu-check/{recipe}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = ["output.root=/tmp/ssd-gpu-check", f"output.run_name={recipe}", f"train.max_steps={steps}",
                     "eval.knn=false", "log.progress_bar=false", "log.tensorboard=false"]
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "ssd.train", "--config", recipe, *overrides], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=280)
        (OUT / f"train_{recipe}.log").write_text(result.stdout + result.stderr)
        summary = next((line for line in reversed(result.stderr.splitlines()) if "summary:" in line), "")
        loss = summary.split("final loss ")[-1].split(",")[0] if summary else "-"
        rate = summary.split(" images/s")[0].rsplit(" ", 1)[-1] if summary else "-"
        rows.append(f"| {recipe} | {result.returncode} | {loss} | {rate} | {time.monotonic() - started:.0f} |")
    print("\n".join(rows))
    # The CPU suite's exact-resume and device-colour tests, here on the GPU (train.device=auto picks it): SIGKILL
    # resume must stay bitwise with CUDA kernels and bf16 autocast.
    tests = ["tests/test_train_resume.py::test_sigkill_then_resume_is_bitwise_equal",
             "tests/test_data_deferred_photometric.py"]
    if dry_run:
        tests = ["tests/test_data_deferred_photometric.py", "-k", "kernel"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    (OUT / "pytest_on_gpu.log").write_text(result.stdout + result.stderr)
    print(f"pytest on the GPU: exit {result.returncode}: {(result.stdout.strip().splitlines() or ['-'])[-1]}")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def throughput(env: dict, dry_run: bool) -> None:
    rows = ["| recipe | batch | variant | images/s | ms/step | peak GiB | MFU | exit |", "|---|---|---|---|---|---|---|---|"]
    variants = dict(VARIANTS)
    gpus = 2 if dry_run else gpu_count()
    if gpus > 1:  # a multi-GPU kind: the same step under DDP and FSDP2 on all of them
        variants |= {f"{parallel} x{gpus}": [f"--parallel={parallel}"] for parallel in ("ddp", "fsdp")}
    with open(OUT / "throughput.jsonl", "a") as log:
        for recipe, batch in RECIPES[:1] if dry_run else RECIPES:
            for variant, extra in variants.items():
                flags = [arg for arg in extra if arg.startswith("--")]
                overrides = [arg for arg in extra if not arg.startswith("--")]
                launcher = [sys.executable]
                if "--parallel" in " ".join(flags):
                    launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
                command = [*launcher, "benchmarks/train_throughput.py", "--recipe", recipe, "--batch-size",
                           str(2 if dry_run else batch), "--steps", "1" if dry_run else "10", "--warmup",
                           "1" if dry_run else "3", *flags, *(["--device", "cpu"] if dry_run else []),
                           *(["model.timm_kwargs={depth: 1}"] if dry_run else []), *overrides]
                report = run_json(command, f"throughput_{recipe}_{variant.replace(' ', '_')}.log", env, 420)
                log.write(json.dumps({"recipe": recipe, "variant": variant, **report}) + "\n")
                rows.append(f"| {recipe} | {batch} | {variant} | {report.get('images_per_second', 0):.1f} | "
                            f"{1000 * report.get('seconds_per_step', 0):.0f} | {report.get('peak_memory_gib', 0):.1f} | "
                            f"{100 * report.get('mfu', 0):.1f}% | {report['exit']} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


def official(env: dict, dry_run: bool) -> None:
    if not (OFFICIAL / "main_dino.py").is_file():
        raise SystemExit(f"no official checkout at {OFFICIAL}: run the prepare part here and carry .official")
    command = [sys.executable, "benchmarks/compare_official.py", "--official", str(OFFICIAL)]
    command += ["--batch-size", "2", "--steps", "1", "--rounds", "1", "--device", "cpu"] if dry_run else \
        ["--batch-size", "64", "--steps", "10", "--rounds", "3"]
    report = run_json(command, "compare_official.log", env, timeout=560)
    print(json.dumps(report, indent=2))


def cifar(env: dict, dry_run: bool) -> None:
    import zipfile

    root = DATA / "extracted"
    if not (root / "cifar10" / "test").is_dir():
        archive = DATA / SHARED_CIFAR.name if (DATA / SHARED_CIFAR.name).is_file() else SHARED_CIFAR
        if not archive.is_file():
            raise SystemExit(f"no {SHARED_CIFAR.name} in {DATA} or {SHARED_CIFAR.parent}: run the prepare part here")
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(root)
    overrides = [f"data.root={root}", "output.run_name=gpu-session-cifar10", "log.progress_bar=false"]
    if dry_run:
        overrides += ["train.max_steps=2", "train.batch_size=8", "train.device=cpu", "eval.knn=false",
                      "model.timm_kwargs={depth: 1}", "head.out_dim=256"]
    limit = "60" if dry_run else "560"  # seconds; SIGTERM makes the run save and exit 75, the next call resumes
    command = ["timeout", "-s", "TERM", limit, sys.executable, "-m", "ssd.train", "--config",
               "dino_cifar10_vit_small", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    with open(OUT / "cifar.log", "a") as log:
        log.write(result.stdout + result.stderr)
    lines = [line for line in result.stderr.splitlines() if any(word in line for word in (
        "resumed from", "summary:", "k-NN", "stop requested", "step ", "Error", "error"))]
    print("\n".join(lines[-15:]))
    outcome = {0: "finished", 75: "saved at SIGTERM: call again to resume"}.get(result.returncode, "failed")
    print(f"exit {result.returncode}: {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["prepare", "check", "throughput", "official", "cifar"])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny steps: checks the script only")
    args = parser.parse_args()
    if args.part == "prepare":
        prepare()
        return
    OUT.mkdir(parents=True, exist_ok=True)
    env = python_env()
    {"check": check, "throughput": throughput, "official": official, "cifar": cifar}[args.part](env, args.dry_run)


if __name__ == "__main__":
    main()
