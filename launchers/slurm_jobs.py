"""What runs inside a SLURM job: the callables that ``launchers.slurm`` pickles and submitit runs on every task.

How a time limit (or ``scancel --signal=USR2``) becomes an exact resume:

1. submitit asks SLURM for ``--signal=USR2@<delay>`` and, before calling us, installs a USR2 handler that
   would call ``checkpoint()``, ``scontrol requeue`` the job and exit - in the middle of whatever Python line
   the signal interrupted, on rank 0 only.
2. ``ssd.train.run`` replaces it for the duration of the training loop with its own handler, which only sets
   a flag. The loop all-reduces the flag every step, so all ranks stop after the same optimizer step, save a
   checkpoint there and return ``status="preempted"``.
3. We then call submitit's handler ourselves, on rank 0 only: it counts the timeout against
   ``--max-timeouts``, calls ``checkpoint()`` (which only has to resubmit: the checkpoint is on disk),
   requeues the job and exits. The other ranks exit too and SLURM restarts the whole job with the same id.
4. The restarted job runs the same callable; ``train.resume=true`` loads the newest checkpoint in the run
   folder, i.e. the step where it stopped, so the final weights equal those of an uninterrupted run.

A USR2 that arrives outside the loop (while building the model, or after it) reaches submitit's own handler,
which does the same from the newest periodic checkpoint. SIGTERM (``scancel``, ``scontrol requeue``, a
preemption) also makes the engine save and stop, but then SLURM itself decides whether the job comes back,
so we must not requeue it: requeuing a cancelled job would bring it back to life.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

import submitit

from launchers.slurm_env import export_distributed_env

log = logging.getLogger("ssd.slurm")


def requeue_signal() -> signal.Signals:
    # submitit reads SUBMITIT_PREEMPT_SIGNAL (set by the launcher's --requeue-signal) when it is imported.
    return submitit.JobEnvironment._usr_sig()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _setup_logging() -> None:
    # The engine configures logging the same way again once torch.distributed is up; until then rank 0 only.
    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {_rank()}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


class TrainJob(submitit.helpers.Checkpointable):
    """Pretraining with a fully resolved config (a plain dict, so the pickle does not depend on OmegaConf)."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def __call__(self) -> dict:
        export_distributed_env()
        _setup_logging()
        # Installed by submitit before it called us; the engine swaps it out while training and puts it back.
        submitit_handler = signal.getsignal(requeue_signal())
        self._log_restart()

        from ssd.config import config_from_dict
        from ssd.train import run

        result = run(config_from_dict(self.config))
        if result["status"] == "preempted" and callable(submitit_handler):  # not when called outside submitit
            self._leave_after_stop(result, submitit_handler)
        return result

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before a requeue. The engine has already saved the checkpoint (or the
        newest periodic one is used), and ``train.resume`` finds it, so resubmitting the same job suffices."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config))

    def _log_restart(self) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts == 0 or _rank() != 0:
            return
        from ssd.engine.checkpoint import list_checkpoints

        run_dir = os.path.join(self.config["output"]["root"], self.config["output"]["run_name"])
        newest = list_checkpoints(run_dir)[-1:] or ["none (starting from scratch)"]
        log.info("job %s restarted (restart %d): resuming from %s", os.environ.get("SLURM_JOB_ID"), restarts, newest[0])

    def _leave_after_stop(self, result: dict, submitit_handler) -> None:
        """The engine saved a checkpoint at ``result["step"]`` and stopped early: requeue or just leave."""
        from ssd.engine.signals import stop_signal as engine_stop_signal

        stop_signal = engine_stop_signal()
        if _rank() == 0:
            if stop_signal == requeue_signal():
                log.info("stopped at step %d on %s: requeuing the job to resume from there",
                         result["step"], signal.Signals(stop_signal).name)
                submitit_handler(stop_signal, None)  # requeues and exits, or raises if out of timeouts
            else:
                name = signal.Signals(stop_signal).name if stop_signal else "a stop request"
                log.info("stopped at step %d on %s; SLURM decides whether the job restarts. To resume by hand, "
                         "submit again with --config %s/%s/config.yaml", result["step"], name,
                         self.config["output"]["root"], self.config["output"]["run_name"])
        # Leave without a result file: the job is not done, and a stale "finished" result from one rank would
        # confuse submitit's job.result() on the submitting side. Exit status 0 so that clusters with
        # KillOnBadExit do not kill rank 0 while it requeues.
        sys.exit(0)


class EvalJob(submitit.helpers.Checkpointable):
    """An evaluation protocol (``eval_protocols.<name>.main(argv)``). On a time limit it is simply requeued
    and starts over: evaluations are short and write their results only at the end."""

    def __init__(self, protocol: str, argv: list[str]) -> None:
        self.protocol = protocol
        self.argv = list(argv)

    def __call__(self):
        export_distributed_env()
        _setup_logging()
        module = importlib.import_module(f"eval_protocols.{self.protocol}")
        return module.main(self.argv)
