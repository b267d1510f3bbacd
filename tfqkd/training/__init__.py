"""Training utilities: the thesis's optimizer and learning-rate schedule.

SGD with Nesterov momentum 0.9 and PyTorch-style (coupled) weight decay 5e-4,
and a per-batch linear warmup followed by milestone decay (thesis 5.1.2,
5.1.3, 5.7), the guard that stops a stage at a NaN/Inf loss or a dead run,
atomic per-epoch stage checkpoints for resuming, and the distribution and
determinism switches of the recipes.
"""

from tfqkd.training.checkpoint import (
    CheckpointState,
    EpochCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    restore,
)
from tfqkd.training.distribute import enable_determinism, is_chief, make_strategy, shard_by_data
from tfqkd.training.guard import DeadRunAlarm, DivergenceGuard, check
from tfqkd.training.optimizers import TorchSGD, make_sgd
from tfqkd.training.schedules import WarmupMultiStep

__all__ = [
    "CheckpointState",
    "DeadRunAlarm",
    "DivergenceGuard",
    "EpochCheckpoint",
    "TorchSGD",
    "WarmupMultiStep",
    "check",
    "enable_determinism",
    "is_chief",
    "latest_checkpoint",
    "list_checkpoints",
    "make_strategy",
    "make_sgd",
    "read_checkpoint",
    "restore",
    "shard_by_data",
]
