"""Runnable recipes: thin ``main(argv)`` modules composing the library.

``python -m tfqkd.recipes.qkd`` (the thesis pipeline), ``baseline``, ``kd``,
``ptq`` and ``qat``. Configs with the thesis's hyperparameters ship in
``configs/``.
"""

#: The recipes, by the name ``tfqkd train NAME`` and ``python -m tfqkd.recipes.NAME`` take.
RECIPES = {
    "qkd": "the thesis pipeline: float baselines, PTQ, SS, SS+TS and QKD, with the comparison table",
    "baseline": "float training of one model",
    "kd": "float knowledge distillation from a trained teacher",
    "ptq": "post-training quantization of a trained float model",
    "qat": "quantization-aware training (QKD phase SS)",
}
