"""The training loop. It knows the engine's contract with a method and nothing about any method itself:

    method.make_collate(seed)                    # how samples become a batch (masks for the masked methods)
    method.param_groups()                        # optimizer groups with lr multipliers; frozen parts left out
    loss, outputs = method(batch, schedule)      # forward + loss (student, teacher, heads inside)
    backward -> clip -> optimizer step           # method.last_layer_parameters() frozen early on; clipped per
                                                 # method.clip_sets() where a method trains several networks
    method.after_step(schedule)                  # teacher update, centres, snapshots
    method.monitor(outputs)                      # loss terms and collapse statistics, at log steps only
    method.eval_backbone() / eval_network        # what evaluation and export read ("teacher" or "student");
    method.eval_backbones(), exported_networks() #   several named networks (multi_distill), when a method has them

One step = `grad_accum_steps` micro-batches. Everything a resumed run needs is in the checkpoint, and every
random draw is seeded from the step or the sample, so a resumed run is bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ssd.checkpoint_import import model_config
from ssd.config import ConfigError, check_world_size, to_dict
from ssd.data import ResumableDistributedSampler, SeededCropsDataset
from ssd.data.deferred_photometric import apply_photometric
from ssd.engine import checkpoint as ckpt
from ssd.engine import distributed, machine, memory, sharded_checkpoint, sharding, signals
from ssd.engine.compile import compile_regions
from ssd.engine.metrics import MetricsWriter, ProgressBar, peak_memory_mib
from ssd.engine.optim import apply_schedule, build_optimizer, clip_gradient_sets, network_parts
from ssd.engine.schedules import TrainingSchedule
from ssd.engine.state import gather_rng_states, restore_rng
from ssd.engine.step_flags import LaggedFlags
from ssd.models.backbone import build_backbone
from ssd.monitors import collapse_kind

log = logging.getLogger("ssd")
COLLAPSE_PATIENCE = 3  # consecutive log points in a collapsed state before warning


class NonFiniteLossError(RuntimeError):
    """The loss or the weights stopped being finite; the message names the newest usable checkpoint."""


def steps_per_epoch(cfg, dataset_size: int, world_size: int) -> int:
    """Optimizer steps in one pass over the data (each rank takes 1/world of it); refuses a data set smaller
    than one global batch."""
    check_world_size(cfg, world_size)
    per_step = cfg.train.batch_size // world_size
    steps = (dataset_size // world_size) // per_step
    if steps == 0:
        raise ConfigError(
            f"the data set has {dataset_size} images, fewer than one global batch of train.batch_size="
            f"{cfg.train.batch_size} (over {world_size} process(es)): lower train.batch_size to at most "
            f"{max(dataset_size // world_size * world_size, world_size)}"
        )
    return steps


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def evaluated_networks(method, cfg) -> dict:
    """{which: (backbone, model config dict)}: what evaluation reads (one network, or each student of a
    multi-student run, the first being the default)."""
    if hasattr(method, "eval_backbones"):
        return method.eval_backbones()
    return {getattr(method, "eval_network", "teacher"): (method.eval_backbone(), to_dict(cfg.model))}


def plain_network(backbone: torch.nn.Module, model: dict, device: torch.device) -> torch.nn.Module:
    """An evaluated network with ordinary tensors: itself, or gathered by every process when sharded (fsdp)."""
    return sharding.plain_copy(backbone, lambda: build_backbone(model_config(model)), device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    def __init__(self, cfg, method: torch.nn.Module, dataset, transform, dist_info, run_dir: Path):
        self.cfg, self.dist, self.run_dir = cfg, dist_info, Path(run_dir)
        self.device = dist_info.device
        self.method = method.to(self.device)
        world, accum = dist_info.world_size, cfg.train.grad_accum_steps
        self.steps_per_epoch = steps_per_epoch(cfg, len(dataset), world)
        self.micro_batch = cfg.train.batch_size // (world * accum)
        self.dataset_size = len(dataset)
        self.sampler = ResumableDistributedSampler(len(dataset), world, dist_info.rank, seed=cfg.train.seed)
        self.samples = SeededCropsDataset(dataset, transform, seed=cfg.train.seed, on_bad_image=cfg.data.on_bad_image)
        self.collate = self.method.make_collate(cfg.train.seed)
        self.workers = machine.loader_workers(cfg.data.num_workers, machine.processes_on_this_node())
        self.loader = torch.utils.data.DataLoader(
            self.samples,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=self.workers > 0,
            worker_init_fn=signals.ignore_stop_signals,  # the main process saves first, then stops the workers
            # A private generator: creating a loader iterator must not consume the global RNG, or a resumed
            # run (which creates it at a different point) would draw different drop-path masks.
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
        if getattr(transform, "photometric_on", "loader") == "device":
            log.info("crops: the loader crops and sends uint8 pixels; colour steps on the device (%s), "
                     "crops.photometric_on=%s", self.device.type, cfg.crops.photometric_on)
        self.schedule = TrainingSchedule(cfg, self.steps_per_epoch, cfg.train.batch_size)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        log.info("precision: %s (train.precision=%s; parameters and optimizer state in fp32)",
                 f"{str(self.amp_dtype).removeprefix('torch.')} autocast on {self.device.type}" if self.amp_dtype
                 else "fp32", cfg.train.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # Before compile, sharding and DDP: the probe steps run the plain modules.
        self.memory_estimate = self.check_memory() if cfg.train.memory_check else None
        if cfg.train.compile:
            counts = compile_regions(self.method)
            log.info("train.compile: %d transformer blocks compiled one by one, %d block-less backbones whole",
                     counts["blocks"], counts["backbones"])
        self.model = self.method
        self.sharded = cfg.train.parallel == "fsdp" and world > 1
        if self.sharded:
            units = sharding.shard_method(self.method, cfg.train.fsdp_bf16_params)
            log.info("train.parallel=fsdp: %d FSDP2 units over %d processes%s", units, world,
                     " (bf16 parameters, fp32 gradient reduction)" if cfg.train.fsdp_bf16_params else "")
        elif cfg.train.parallel == "fsdp":
            log.info("train.parallel=fsdp on one process: nothing to shard, the run trains unsharded")
        elif world > 1:
            self.model = DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Buffers (BatchNorm running statistics of student and teacher) are set to rank 0's at every
                # forward: ranks then hold identical buffers, so the checkpoint (written by rank 0) resumes every
                # rank exactly. The loss center is all-reduced anyway.
                broadcast_buffers=True,
            )
        self.sharded_checkpoints = cfg.checkpoint.format == "sharded" or (cfg.checkpoint.format == "auto"
                                                                          and self.sharded)
        # After sharding: FSDP2 replaces the parameters with DTensors, which the optimizer must hold.
        self.optimizer = build_optimizer(self.method.param_groups(), cfg.optim.betas, self.device)
        self.trainable = [p for p in self.method.parameters() if p.requires_grad]
        # Gradients are clipped per set: one set for most methods, one per student for multi-student distillation.
        self.clip_sets = self._clip_sets(cfg.optim.clip_mode)
        self.clip_mode = "global" if cfg.optim.clip_mode == "per_module" else cfg.optim.clip_mode
        self.step = 0
        self.flags = LaggedFlags(self.device)
        self.last_checkpoint: Path | None = None
        self.last_usable_checkpoint: Path | None = None
        self.collapse_counts: dict[str, int] = {}
        self.show_bar = False
        self.images = None  # fixed images drawn into TensorBoard, by rank 0 alone (the one that writes it)
        if dist_info.is_main and cfg.log.images_every_steps:
            from ssd.visualize import TrainingImages

            self.images = TrainingImages(cfg, dataset)

    def _clip_sets(self, mode: str) -> list[list[torch.nn.Parameter]]:
        """The parameter sets clipped each by its own norm: a method's own sets (one per student of a
        multi-student run) or all trainable parameters; per_module: each part of each student network."""
        if mode == "per_module":
            parts = [part for network in self.method.student_networks() for part in network_parts(network)]
            covered = {id(p) for part in parts for p in part}
            rest = [p for p in self.trainable if id(p) not in covered]  # a method's parameters outside its students
            return parts + ([rest] if rest else [])
        return self.method.clip_sets() if hasattr(self.method, "clip_sets") else [self.trainable]

    def check_memory(self) -> memory.MemoryEstimate | None:
        """Measure what a step needs (`ssd.engine.memory`); refuse on every rank when it cannot fit."""
        def make_batch(size: int) -> dict:
            return self._to_device(self.collate([self.samples[(0, i % len(self.samples))] for i in range(size)]))

        shards = self.dist.world_size if self.cfg.train.parallel == "fsdp" else 1
        try:
            estimate, out_of_memory = memory.measure(
                self.method, make_batch, self.micro_batch, self.device, self.amp_dtype, self.schedule(0),
                self.workers, machine.processes_on_this_node(), shards), ""
        except torch.OutOfMemoryError as error:  # the frames holding the probe's tensors go with the exception
            estimate, out_of_memory = None, str(error).splitlines()[0] if str(error) else "out of memory"
        failed = distributed.all_reduce_sum(torch.tensor([float(bool(out_of_memory))], device=self.device))
        if failed.item() > 0:
            return self._probe_out_of_memory(out_of_memory or "on another process", shards)
        too_large = distributed.all_reduce_sum(torch.tensor([float(estimate.share > memory.REFUSE_ABOVE)],
                                                            device=self.device))
        if too_large.item() > 0:
            raise ConfigError(memory.refusal(estimate, self.cfg, self.dist.world_size))
        if self.dist.is_main:
            log.log(logging.WARNING if estimate.share > memory.WARN_ABOVE else logging.INFO, estimate.describe())
        return estimate

    def _probe_out_of_memory(self, error: str, shards: int) -> None:
        """The probe runs an unsharded copy of the method: under FSDP that copy may not fit one device when the
        sharded run does, so the check is skipped with a warning; otherwise 2 images already do not fit."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if shards > 1:
            if self.dist.is_main:
                log.warning("memory check skipped: its probe runs an unsharded copy of the model, which ran out of "
                            "device memory (%s); the run goes on sharded over %d processes", error, shards)
            return None
        raise ConfigError(memory.probe_out_of_memory_refusal(error))

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        rng_states = gather_rng_states(self.dist.world_size)  # collective
        if self.sharded:  # each process holds a shard: the verdict is over all of them
            health = sharding.weights_health(self.method.parameters(), self.cfg.checkpoint.max_abs_weight)
        else:
            # Every rank holds the same weights (DDP), so every rank reaches the same verdict without a collective.
            health = ckpt.weights_health(self.method.parameters(), self.cfg.checkpoint.max_abs_weight)
        if not health["finite"]:
            raise NonFiniteLossError(f"the weights are not finite at step {self.step}; no checkpoint was written. "
                                     + self._recovery_advice())
        epoch = self.schedule.epoch_of(self.step)
        state = {
            "config": to_dict(self.cfg),
            "step": self.step,
            "epoch": epoch,
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "sampler": {"epoch": epoch, "start": self._epoch_offset(self.step), "seed": self.cfg.train.seed},
            "world_size": self.dist.world_size,
            "data": {"images": self.dataset_size},
            "health": health,
            # what evaluation and export read: "teacher" (EMA) or "student" (fixed teachers)
            "eval_backbone": getattr(self.method, "eval_network", "teacher"),
            # methods that train several networks (multi_distill): where each one is, and its model config
            "networks": getattr(self.method, "exported_networks", dict)(),
        }
        path = ckpt.checkpoint_path(self.run_dir, self.step, sharded=self.sharded_checkpoints)
        if self.sharded_checkpoints:  # every process writes its slices; nothing is gathered
            ckpt.save_sharded(path, self.method, self.optimizer, state)
        elif self.sharded:  # whole tensors gathered to process 0: the same single file as DDP's
            state["method"], state["optimizer"] = sharding.full_state(self.method, self.optimizer, self.dist.is_main)
        else:
            state["method"], state["optimizer"] = self.method.state_dict(), self.optimizer.state_dict()
        if self.dist.is_main:
            if not self.sharded_checkpoints:
                ckpt.save_checkpoint(path, state)
            if not health["usable"]:
                log.warning("weights reach %.3g at step %d (checkpoint.max_abs_weight=%g): the run is blowing up. "
                            "%s stays as the newest usable checkpoint", health["max_abs_weight"], self.step,
                            self.cfg.checkpoint.max_abs_weight, self.last_usable_checkpoint or "none")
            protect = [path] + ([self.last_usable_checkpoint] if self.last_usable_checkpoint else [])
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep, protect=protect)
        distributed.barrier()
        self.last_checkpoint = path
        if health["usable"]:
            self.last_usable_checkpoint = self.last_checkpoint
        return path if self.dist.is_main else None

    def _recovery_advice(self) -> str:
        usable = self.last_usable_checkpoint
        if usable is None:
            return "No usable checkpoint exists yet: start again with a lower optim.base_lr or a longer warmup."
        return (f"The newest usable checkpoint is {usable} (kept). Resume from it with a fix, e.g.: "
                + ckpt.resume_command(self.run_dir, usable, self.cfg))

    def resume(self, path: Path, state: dict | None = None) -> None:
        """Continue from checkpoint `path` (chosen by `run_folder.open_run_folder`; `state` if already loaded)."""
        state = state if state is not None else ckpt.load_checkpoint(path)
        try:
            if state.get("sharded"):  # each process reads the slices it holds (whole tensors when unsharded)
                sharded_checkpoint.load_into(Path(path), self.method, self.optimizer, state)
            elif self.sharded:
                sharding.load_full_state(self.method, self.optimizer, state["method"], state["optimizer"])
            else:
                self.method.load_state_dict(state["method"])
                self.optimizer.load_state_dict(state["optimizer"])
        except RuntimeError as error:  # tensor shapes or names: the checkpoint was written for another model
            first = str(error).strip().splitlines()
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit the model of this config ("
                                       f"{' '.join(first[:3])[:400]}); resume it with the config it was "
                                       "written with") from None
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if not restore_rng(state["rng"], self.dist.rank) or state.get("world_size") != self.dist.world_size:
            log.warning("checkpoint was written by %s processes, this run has %s: drop-path randomness will "
                        "differ from an uninterrupted run", state.get("world_size"), self.dist.world_size)
        self.last_checkpoint = path
        if state.get("health", {}).get("usable", True):
            self.last_usable_checkpoint = Path(path)
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def initialize_from(self, source: str) -> Path:
        """Weights (student, teacher, heads, centres) from another run's checkpoint, for a new run at step 0."""
        path = Path(source).expanduser()
        if path.is_dir():
            path = ckpt.newest_usable_checkpoint(path) or path
        try:
            state = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as error:
            raise ConfigError(f"train.init_from={source}: {error}") from None
        try:
            if state.get("sharded"):
                result = sharded_checkpoint.load_into(path, self.method, None, state, strict=False)
            elif self.sharded:
                result = sharding.load_full_state(self.method, None, state["method"], None, strict=False)
            else:
                result = self.method.load_state_dict(state["method"], strict=False)
        except RuntimeError as error:  # tensor shapes differ
            detail = " ".join(str(error).split())[:300]
            raise ConfigError(f"train.init_from={path} does not fit this model ({detail}); use a checkpoint of the "
                              "same model and heads") from None
        # A snapshot the source method did not have (DINOv3's Gram teacher, starting from a DINOv2 run) is
        # taken from the loaded teacher; anything else missing or left over means another architecture.
        missing = [key for key in result.missing_keys if not key.startswith("gram_teacher.")]
        if missing or result.unexpected_keys:
            raise ConfigError(f"train.init_from={path} does not fit this model: missing {missing[:5]}, unexpected "
                              f"{result.unexpected_keys[:5]}; use a checkpoint of the same model and heads")
        if result.missing_keys and hasattr(self.method, "refresh_gram_teacher"):
            self.method.refresh_gram_teacher()
        if self.dist.is_main:
            log.info("initialised from %s (step %s of that run); this run starts at step 0", path, state.get("step"))
        return path

    def _epoch_offset(self, step: int) -> int:
        """Samples this rank already consumed in the epoch that contains `step`."""
        return (step % self.steps_per_epoch) * self.micro_batch * self.cfg.train.grad_accum_steps

    # ---- loop --------------------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current step on, epoch after epoch, starting mid-epoch after a resume."""
        epoch = self.schedule.epoch_of(self.step)
        self.sampler.set_epoch(epoch, start=self._epoch_offset(self.step))
        while True:
            micro_batches_left = (self.steps_per_epoch - self.step % self.steps_per_epoch) * (
                self.cfg.train.grad_accum_steps
            )
            with signals.stop_signals_blocked():  # workers are forked here; see ssd.engine.signals
                iterator = iter(self.loader)
            for index, batch in enumerate(iterator):
                yield batch
                if index + 1 == micro_batches_left:
                    break
            epoch += 1
            self.sampler.set_epoch(epoch, start=0)

    def _to_device(self, batch: dict) -> dict:
        non_blocking = self.device.type == "cuda"
        moved = {"crops": [crop.to(self.device, non_blocking=non_blocking) for crop in batch["crops"]]}
        for name, value in batch.items():  # masks and whatever else a method's collate adds; labels stay
            if name not in moved and name != "photometric":
                moved[name] = value if name in ("labels", "indices") else value.to(self.device, non_blocking=non_blocking)
        if "photometric" in batch:  # crops.photometric_on=device: uint8 crops, colour steps applied here
            moved["crops"] = apply_photometric(moved["crops"], batch["photometric"])
        return moved

    def _forward_backward(self, batches, schedule: dict) -> tuple[torch.Tensor, dict]:
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        outputs: dict = {}
        for micro in range(accum):
            batch = self._to_device(next(batches))
            with self._gradient_sync(micro == accum - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, outputs = self.model(batch, schedule)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        return loss_sum, outputs

    def _gradient_sync(self, sync: bool):
        """Gradients are reduced across processes on the last micro-batch of a step only."""
        if self.sharded:
            self.method.set_requires_gradient_sync(sync)
        elif not sync and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, batches, schedule: dict) -> tuple[torch.Tensor, dict]:
        """One optimizer step, queued without waiting for it. Returns (grad norm, outputs), still on the device;
        the step's loss and flags go to `self.flags`."""
        apply_schedule(self.optimizer, schedule["lr"], schedule["weight_decay"])
        if self.sharded:  # as DDP does at every forward: all processes take rank 0's buffers (BatchNorm statistics)
            sharding.broadcast_buffers(self.method)
        loss, outputs = self._forward_backward(batches, schedule)
        # One collective per step carries the loss, a non-finite flag and any stop request, so every rank
        # takes the same decision at the same step; `fit` reads it a step later (ssd/engine/step_flags.py).
        stop = loss.new_full((), float(signals.stop_requested()))  # a fill kernel: no host synchronisation
        flags = distributed.all_reduce_sum(torch.stack([loss, (~torch.isfinite(loss)).float(), stop]))
        self.flags.push(self.step, flags)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradient_sets(self.clip_sets, self.cfg.optim.clip_grad, self.clip_mode)
        if schedule["freeze_last_layer"]:
            for param in self.method.last_layer_parameters():
                param.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(schedule)
        return grad_norm, outputs

    def fit(self) -> dict:
        cfg = self.cfg
        total_steps = self.schedule.total_steps
        writer = MetricsWriter(self.run_dir, self.dist.is_main, cfg.log.tensorboard)
        # A bar only on a terminal; in a log file (SLURM, nohup) one plain line per log step instead.
        self.show_bar = self.dist.is_main and cfg.log.progress_bar and sys.stderr.isatty()
        bar = ProgressBar(self.show_bar, total_steps, self.step)
        periodic_knn = None  # eval.knn_every_epochs: the evaluated network's k-NN at epoch ends (ssd.knn_report)
        if cfg.eval.knn_every_epochs:
            from ssd.knn_report import PeriodicKnn

            which = next(iter(evaluated_networks(self.method, cfg)))  # "teacher", "student" or a student's name
            periodic_knn = PeriodicKnn(cfg, self.steps_per_epoch, self.device, self.dist.is_main, which)
        handlers = signals.install_handlers()
        status = "finished"
        started, first_step, mean_loss = time.perf_counter(), self.step, float("nan")
        try:
            batches = self._batches()
            window_start, window_steps = time.perf_counter(), 0
            images_per_second = 0.0  # over the last log window, for the progress bar
            while self.step < total_steps:
                schedule = self.schedule(self.step)
                grad_norm, outputs = self.train_step(batches, schedule)
                self.step += 1
                window_steps += 1

                log_now = self.step % cfg.log.every_steps == 0 or self.step == total_steps
                save_now = self.step % cfg.checkpoint.every_steps == 0 or self.step == total_steps
                # Other steps check the previous step's flags, without waiting for this one's work.
                mean_loss, stop = self._check_flags(log_now or save_now, mean_loss)
                if stop and not (log_now or save_now):  # noticed a step late: this step's loss before saving
                    mean_loss, _ = self._check_flags(True, mean_loss)
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    images_per_second = window_steps * cfg.train.batch_size / max(elapsed, 1e-9)
                    self._log(writer, schedule, mean_loss, grad_norm, images_per_second, outputs)
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1, loss=mean_loss, images_per_s=images_per_second)
                every = cfg.log.images_every_steps
                if every and (self.step % every == 0 or self.step == total_steps):
                    drawing_started = time.perf_counter()
                    backbone = self.evaluated_backbone()  # gathered by every process when sharded
                    if self.images is not None:  # drawn by rank 0 alone
                        self.images.log(writer.board, backbone, self.step)
                    window_start += time.perf_counter() - drawing_started  # images/s counts training time only

                if save_now or stop:
                    self.save()
                if stop and self.step < total_steps:
                    status = "preempted"
                    if self.dist.is_main:
                        log.info("stop requested: saved checkpoint at step %d, exiting", self.step)
                    break
                if periodic_knn is not None and periodic_knn.due(self.step):  # after the stop check: never delays one
                    knn_started = time.perf_counter()
                    writer.write(self.step, periodic_knn(self.evaluated_backbone(), self.step), group="eval")
                    window_start += time.perf_counter() - knn_started  # images/s counts training time only
        finally:
            signals.restore_handlers(handlers)
            bar.close()
            writer.close()
        seconds = time.perf_counter() - started
        return {"status": status, "step": self.step, "run_dir": str(self.run_dir), "seconds": seconds,
                "steps_done": self.step - first_step, "final_loss": mean_loss,
                "images_per_second": (self.step - first_step) * cfg.train.batch_size / max(seconds, 1e-9)}

    def _check_flags(self, everything: bool, mean_loss: float) -> tuple[float, bool]:
        """(the newest mean loss read, whether a stop was requested); raises on a non-finite loss."""
        stop = False
        for flags in self.flags.read(everything):
            mean_loss = flags.loss_sum / self.dist.world_size
            if flags.non_finite:
                raise NonFiniteLossError(f"loss is {mean_loss} at step {flags.step}. " + self._recovery_advice())
            stop = stop or flags.stop
        return mean_loss, stop

    def evaluated_backbone(self) -> torch.nn.Module:
        """The network evaluation reads, with ordinary tensors (gathered by every process when sharded)."""
        backbone, model = next(iter(evaluated_networks(self.method, self.cfg).values()))
        return plain_network(backbone, model, self.device)

    def _log(self, writer, schedule, loss, grad_norm, images_per_second, outputs) -> None:
        stats = self.method.monitor(outputs)
        values = {
            "loss": loss,
            "lr": schedule["lr"],
            "weight_decay": schedule["weight_decay"],
            "teacher_momentum": schedule["teacher_momentum"],
            "teacher_temp": schedule["teacher_temp"],
            "images_per_second": images_per_second,
            "peak_memory_mib": peak_memory_mib(self.device),
            "grad_norm": float(grad_norm),
            "epoch": self.schedule.epoch_of(self.step - 1),
            **{k: v for k, v in stats.items() if k != "log_num_prototypes"},
        }
        writer.write(self.step, values)
        if self.dist.is_main and not self.show_bar:
            remaining = (self.schedule.total_steps - self.step) * self.cfg.train.batch_size / max(images_per_second, 1e-9)
            log.info("step %d/%d  loss %.4f  %.1f images/s  ETA %s", self.step, self.schedule.total_steps, loss,
                     images_per_second, _duration(remaining))
        kind = collapse_kind(stats)
        for name in ("uniform", "one-hot"):
            self.collapse_counts[name] = self.collapse_counts.get(name, 0) + 1 if kind == name else 0
            if self.collapse_counts[name] == COLLAPSE_PATIENCE and self.dist.is_main:
                log.warning(
                    "the teacher output looks collapsed to a %s distribution at step %d (entropy %.3f of max "
                    "%.3f, KL to uniform %.3f, feature std %.4f): check teacher temperature, centering and lr",
                    name, self.step, stats["teacher_entropy"], stats["log_num_prototypes"],
                    stats["teacher_kl_uniform"], stats["teacher_feature_std"])
        if not math.isfinite(loss):
            log.warning("non-finite loss logged at step %d", self.step)
