"""Knowledge distillation: the KD loss and the QKD training model.

References: Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"; Kim et al. 2019, "QKD: Quantization-aware Knowledge Distillation";
thesis sections 3.4, 3.6 and 5.1 (Algorithms 1-4).
"""

from tfqkd.distill.losses import kd_loss
from tfqkd.distill.qkd import PHASES, QKD, precompute_teacher_logits

__all__ = ["PHASES", "QKD", "kd_loss", "precompute_teacher_logits"]
