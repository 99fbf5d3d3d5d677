"""The README's main job: `python -m ssd.train` with no arguments trains DINO on the embedded digits and
reports k-NN accuracy that clearly beats the same network at random initialisation."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.tiny import REPO, subprocess_env


@pytest.mark.slow
def test_default_command_trains_and_beats_random_init():
    before = set((REPO / "checkpoints").glob("dino_digits_demo-*"))
    result = subprocess.run([sys.executable, "-m", "ssd.train"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    created = set((REPO / "checkpoints").glob("dino_digits_demo-*")) - before
    assert len(created) == 1, created
    run_dir = created.pop()
    try:
        assert "run folder:" in result.stderr and str(run_dir.name) in result.stderr
        report = json.loads((run_dir / "knn.json").read_text())
        trained = report["results"]["trained teacher"]["k=20"]["top1"]
        random_init = report["results"]["random init (same arch)"]["k=20"]["top1"]
        pixels = report["results"]["raw pixels"]["k=20"]["top1"]
        assert "trained teacher" in result.stdout and "raw pixels" in result.stdout
        assert "Loading faiss" not in result.stderr and "faiss.loader" not in result.stderr  # no library chatter
        assert pixels > 90.0
        # Measured (seed 0, 2026-11-22): 94.4% trained vs 86.4% random init; seeds 1-2 gave 90.6-93.3% vs
        # 87.5-88.9%. 85% is the demo's promise; 4 points (14 of the 360 held-out images) above random init is
        # half the measured gap, and a broken loss, teacher or loop stays at the random-init level.
        assert trained >= 85.0, report
        assert trained > random_init + 4.0, report
        assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
        assert list(run_dir.glob("checkpoint_*.pt")) and list((run_dir / "tb").iterdir())
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for key in ("loss", "lr", "weight_decay", "teacher_momentum", "teacher_temp", "images_per_second",
                    "peak_memory_mib", "grad_norm", "teacher_entropy", "teacher_kl_uniform", "teacher_feature_std"):
            assert key in logged[-1], key
    finally:
        shutil.rmtree(run_dir)
