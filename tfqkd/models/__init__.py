"""The tfqkd model zoo (thesis chapter 5.2, tables 5.2 and 5.8, chapter 6.1).

``create_model(name, num_classes=..., input_shape=..., quant=...)`` builds any registered
architecture as a functional Keras model that outputs logits. Families:

* ``densenet``: DenseNet-BC (k=32) 21/37/63/121/169/201/264 and the DPU variants
  ``densenet21_dpu``, ``densenet37_dpu``, ``densenet63_dpu``.
* ``mlp``: MNIST MLPs ``dnn1200``, ``dnn800``, ``dnn300``, ``dnn30``, ``kl_mlp_teacher``,
  ``kl_mlp_student``.
* ``mlperf_tiny``: ``resnet8``, ``ds_cnn``, ``mobilenet_v1_025``, ``fc_autoencoder``.
* ``mobilenet``: ``mobilenet_v1``, ``mobilenet_v2`` with ``width_multiplier``.
"""

# The family modules register their models on import.
from tfqkd.models import densenet, mlp, mlperf_tiny, mobilenet  # noqa: F401
from tfqkd.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from tfqkd.models.summary import ModelRow, count_macs, count_params, model_table

__all__ = [
    "ModelInfo",
    "ModelRow",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "count_params",
    "count_macs",
    "model_table",
]
