"""`python -m launchers.slurm`: submit pretraining (or an evaluation protocol) to SLURM through submitit.

Takes the same ``--config`` and ``key=value`` overrides as ``python -m ssd.train``, plus cluster options. One
task per GPU; each task is one rank of the job, so ``train.batch_size`` is split over nodes x tasks per node.
The job's files and logs live in the run folder (``<output.root>/<output.run_name>/slurm/``), and a job that
hits its time limit is requeued and resumes from the step where it stopped (see launchers/slurm_jobs.py).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import _make_sbatch_string

from launchers.filesystems import shared_fs_warning
from ssd.config import save_config
from ssd.engine.machine import AUTO_WORKERS_CAP

CODE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding launchers/ and ssd/

EXAMPLES = """\
examples:
  # DINO ViT-S/16 on ImageNet, 4 nodes x 8 GPUs, 24 h slots, requeued on time-out
  python -m launchers.slurm --config dino_vit_small16_imagenet --nodes 4 --gpus-per-node 8 \\
      --cpus-per-task 10 --mem-gb 480 --partition gpu --time 1440 data.root=/datasets/imagenet/train
  # print the sbatch script and the resolved config, submit nothing
  python -m launchers.slurm --dry-run --nodes 2 --gpus-per-node 8 optim.base_lr=1e-3
  # k-NN evaluation of a run as a job; the protocol's own arguments follow --
  python -m launchers.slurm --eval knn --gpus-per-node 1 -- checkpoints/my_run --output knn.json
"""


class LaunchError(RuntimeError):
    """Something the user can fix before submitting; the message says what."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launchers.slurm", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="recipe name in ssd/configs/ or a YAML file, e.g. a run's "
                        "config.yaml to resume it (default: dino_digits_demo)")
    parser.add_argument("--eval", metavar="PROTOCOL", default=None,
                        help="submit eval_protocols.PROTOCOL (e.g. knn) instead of pretraining")
    parser.add_argument("--job-dir", default=None, help="with --eval: folder for the job's files and logs "
                        "(default: checkpoints/eval-PROTOCOL-<time>)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and the config; submit nothing")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    cluster.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one task each (0: CPU only)")
    cluster.add_argument("--tasks-per-node", type=int, default=None,
                         help="processes per node (default: one per GPU, 1 without GPUs)")
    cluster.add_argument("--cpus-per-task", type=int, default=None,
                         help="CPU cores per task (default: data.num_workers + 1 for training (11 when it is -1), else 1)")
    cluster.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    cluster.add_argument("--partition", default=None)
    cluster.add_argument("--account", default=None)
    cluster.add_argument("--qos", default=None)
    cluster.add_argument("--constraint", default=None, help="node features, e.g. 'a100|h100'")
    cluster.add_argument("--exclude", default=None, help="nodes not to use, e.g. 'node[01-03]'")
    cluster.add_argument("--time", type=int, default=1440, help="time limit of each slot in minutes (default 1440)")
    cluster.add_argument("--job-name", default=None, help="default: the run name")
    cluster.add_argument("--max-timeouts", type=int, default=10,
                         help="how many times a job that hits its time limit is requeued (default 10)")
    cluster.add_argument("--requeue-signal", choices=("USR2", "USR1"), default="USR2",
                         help="signal SLURM sends before the time limit (default USR2; NCCL may use USR1)")
    cluster.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                         help="how long before the time limit the signal comes: time to save a checkpoint")
    cluster.add_argument("--setup", action="append", default=[], metavar="SHELL_LINE",
                         help="line run in the batch script before the job starts, e.g. 'module load cuda' "
                         "(repeatable)")
    parser.add_argument("args", nargs="*", metavar="key=value | -- PROTOCOL_ARGS",
                        help="config overrides; with --eval, the protocol's arguments after --")
    return parser


def sbatch_parameters(args: argparse.Namespace, job_name: str, cpus_per_task: int) -> dict:
    """submitit's SLURM parameters (its names, which are sbatch's with underscores)."""
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    params = {
        "job_name": job_name,
        "time": args.time,
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "signal_delay_s": args.signal_delay,
        "stderr_to_stdout": True,  # one log per rank, in the order things happened
        "setup": [
            *args.setup,
            # The job reads SUBMITIT_PREEMPT_SIGNAL when it imports submitit; sbatch's --signal must match.
            f"export SUBMITIT_PREEMPT_SIGNAL={args.requeue_signal}",
            # Otherwise torch starts one thread per core of the node in every task, and the tasks fight over
            # the cores (torchrun sets 1 for the same reason).
            f"export OMP_NUM_THREADS={cpus_per_task}",
            # The job unpickles launchers.slurm_jobs and imports ssd: let it find the code that submitted it
            # even when it was not pip-installed and the job starts in another folder.
            f"export PYTHONPATH={shlex.quote(str(CODE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        ],
        "additional_parameters": {"signal": f"{args.requeue_signal}@{args.signal_delay}"},
    }
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb is not None:
        params["mem"] = f"{args.mem_gb:g}GB" if args.mem_gb == int(args.mem_gb) else f"{int(args.mem_gb * 1024)}MB"
    for name in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    return params


def sbatch_script(folder: Path, params: dict) -> str:
    """The script submitit writes and passes to sbatch. Uses submitit's own (private) template builder so that
    --dry-run shows exactly what would be submitted; it needs no SLURM installed, unlike the executor."""
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def submit(folder: Path, params: dict, max_timeouts: int, job):
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeouts)
    executor.update_parameters(**{f"slurm_{name}": value for name, value in params.items()})
    return executor.submit(job)


def check_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "SLURM was not found: there is no 'sbatch' on PATH. On a machine without SLURM, run the same "
            "training with torchrun (torchrun --nproc-per-node=NUM_GPUS -m ssd.train [--config ...] "
            "[key=value ...]), or add --dry-run to see the sbatch script that would be submitted."
        )


def prepare_training(args: argparse.Namespace) -> tuple:
    """Resolved config, run folder and job callable for pretraining."""
    from launchers.slurm_jobs import TrainJob
    from ssd.config import ConfigError, check_world_size, load_config, to_dict

    processes = args.nodes * (args.tasks_per_node or max(args.gpus_per_node, 1))
    try:
        cfg = load_config(args.config, args.args)
        check_world_size(cfg, processes)
    except ConfigError as error:
        raise LaunchError(f"config error: {error}") from None
    # Fixed now, not in the job: every restart of the job must find the same run folder and its checkpoints.
    if not cfg.output.run_name:
        cfg.output.run_name = f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.output.root = str(Path(cfg.output.root).expanduser().resolve())
    run_dir = Path(cfg.output.root) / cfg.output.run_name
    check_data_root(cfg.data)
    check_resume(cfg, run_dir)
    # The data loader's workers plus the training loop; with data.num_workers=-1 the job asks for the workers the
    # auto rule would pick on a large node, and each task then uses the cores SLURM gave it.
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else AUTO_WORKERS_CAP
    cpus = args.cpus_per_task or workers + 1
    return cfg, run_dir, cpus, TrainJob(to_dict(cfg))


def check_cluster_options(args: argparse.Namespace) -> None:
    """Numbers sbatch would reject later, or accept and misread, are refused before anything is written."""
    minimum = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "time": 1,
               "max_timeouts": 0, "signal_delay": 0}
    for name, lowest in minimum.items():
        value = getattr(args, name)
        if value is not None and value < lowest:
            raise LaunchError(f"--{name.replace('_', '-')} is {value}; it must be at least {lowest}")
    if args.mem_gb is not None and args.mem_gb <= 0:
        raise LaunchError(f"--mem-gb is {args.mem_gb}; give a positive amount or leave it out")
    if args.signal_delay >= args.time * 60:
        raise LaunchError(f"--signal-delay {args.signal_delay} s is not shorter than --time {args.time} min: "
                          "the job would be told to stop before it starts")


def check_data_root(data) -> None:
    """The data folder must exist where the job will look (checked here, so a typo costs no queue wait)."""
    if data.dataset == "digits":
        return
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise LaunchError(f"data.root={data.root} is not a folder on this machine ({root}"
                          f"{' does not exist' if not root.exists() else ' is a file'}); the job would fail at start. "
                          "Fix the path (it must be visible from the compute nodes too)")


def check_resume(cfg, run_dir: Path) -> None:
    """When the run folder already holds checkpoints, the same config checks as the job's own start."""
    from ssd.engine.checkpoint import list_checkpoints
    from ssd.engine.run_folder import RunFolderError, check_resume_config

    if not list_checkpoints(run_dir):
        return
    try:
        check_resume_config(cfg, run_dir)
    except RunFolderError as error:
        raise LaunchError(str(error)) from None


def prepare_eval(args: argparse.Namespace) -> tuple:
    import importlib.util

    from launchers.slurm_jobs import EvalJob

    if importlib.util.find_spec(f"eval_protocols.{args.eval}") is None:
        available = sorted(p.stem for p in (CODE_ROOT / "eval_protocols").glob("*.py") if "def main(" in p.read_text())
        raise LaunchError(f"no evaluation protocol eval_protocols.{args.eval}; modules there: {', '.join(available)}")
    job_dir = Path(args.job_dir or f"checkpoints/eval-{args.eval}-{time.strftime('%Y%m%d-%H%M%S')}")
    return job_dir.expanduser().resolve(), args.cpus_per_task or 1, EvalJob(args.eval, args.args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" belongs to the job (an eval protocol's own options); argparse's
    # intermixed parsing (options between overrides) would otherwise try to read them as ours.
    protocol_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, protocol_args = argv[:split], argv[split + 1:]
    args = build_parser().parse_intermixed_args(argv)
    args.args = [*args.args, *protocol_args]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return launch(args)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def launch(args: argparse.Namespace) -> int:
    check_cluster_options(args)
    if args.eval:
        job_dir, cpus, job = prepare_eval(args)
        cfg, name = None, args.job_name or f"eval-{args.eval}"
    else:
        cfg, job_dir, cpus, job = prepare_training(args)
        name = args.job_name or cfg.output.run_name
    folder = job_dir / "slurm"
    params = sbatch_parameters(args, name, cpus)
    warning = shared_fs_warning(job_dir, args.nodes)
    if warning:
        logging.getLogger("ssd.slurm").warning(warning)
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print_dry_run(args, folder, params, cfg)
        return 0
    check_sbatch()
    created = not job_dir.exists()
    job_dir.mkdir(parents=True, exist_ok=True)
    if cfg is not None and not (job_dir / "config.yaml").exists():
        # Written now so the resume-by-hand command works from the start; a run folder that already has one
        # keeps it until the job has checked the new config against it (ssd.engine.run_folder).
        from ssd.engine.run_folder import saved_form

        save_config(saved_form(cfg), job_dir / "config.yaml")
    try:
        submitted = submit(folder, params, args.max_timeouts, job)
    except FailedJobError as error:
        if created:  # leave no run folder behind for a job that never existed
            shutil.rmtree(job_dir, ignore_errors=True)
        raise LaunchError(
            f"sbatch refused the job: {str(error).strip()}. Check --partition, --account, --qos, --time and the "
            "resources asked for (--dry-run prints the script)."
        ) from None
    print_submitted(submitted, job_dir, params, is_training=cfg is not None)
    return 0


def print_dry_run(args: argparse.Namespace, folder: Path, params: dict, cfg) -> None:
    print(f"# dry run: nothing submitted. sbatch script (submitit writes it to {folder}/<job id>_submission.sh):")
    print(sbatch_script(folder, params))
    if cfg is None:
        print(f"# each task runs: python -m eval_protocols.{args.eval} {shlex.join(args.args)}")
        return
    from omegaconf import OmegaConf

    print(f"# resolved config (saved as {folder.parent / 'config.yaml'} on submission):")
    print(OmegaConf.to_yaml(cfg), end="")


def print_submitted(job, job_dir: Path, params: dict, is_training: bool) -> None:
    log_file = job.paths.stdout  # rank 0; with stderr_to_stdout it holds everything rank 0 printed
    tasks = params["nodes"] * params["ntasks_per_node"]
    print(f"submitted job {job.job_id}: {params['nodes']} node(s) x {params['ntasks_per_node']} task(s) = {tasks}")
    print(f"  {'run' if is_training else 'job'} folder: {job_dir}")
    print(f"  logs:       {log_file} (rank 0; rank R writes {job.job_id}_R_log.out next to it)")
    print(f"  follow:     tail -F {log_file}")
    print(f"  status:     squeue -j {job.job_id}    cancel: scancel {job.job_id}")
    if is_training:
        print(f"  resume by hand (after a cancel or a failure): python -m launchers.slurm --config "
              f"{job_dir / 'config.yaml'} [same cluster options]")


if __name__ == "__main__":
    sys.exit(main())
