"""How a run starts: ``python -m ssd.train`` / torchrun locally, ``python -m launchers.slurm`` on a SLURM cluster."""
