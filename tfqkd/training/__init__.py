"""Training utilities: the thesis's optimizer and learning-rate schedule.

SGD with Nesterov momentum 0.9 and PyTorch-style (coupled) weight decay 5e-4,
and a per-batch linear warmup followed by milestone decay (thesis 5.1.2,
5.1.3, 5.7), and the divergence guard that stops a stage at a NaN/Inf loss.
"""

from tfqkd.training.guard import DivergenceGuard, check
from tfqkd.training.optimizers import TorchSGD, make_sgd
from tfqkd.training.schedules import WarmupMultiStep

__all__ = ["DivergenceGuard", "TorchSGD", "WarmupMultiStep", "check", "make_sgd"]
