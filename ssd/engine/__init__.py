"""The training engine: loop, schedules, optimizer, checkpoints, distributed setup, signals, logging."""
