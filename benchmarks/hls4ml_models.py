"""hls4ml takes the students of every model family: compiled C++ emulation against the trained model (issue 14).

    python benchmarks/hls4ml_models.py                      # all models, 8 and 4 bits, about 15 min on 2 cores
    python benchmarks/hls4ml_models.py --models resnet8 --bits 8

Each model is trained briefly on the bundled mnist5k (4,000 training images, five epochs, Adam 1e-3;
long enough that the CNNs' BatchNormalization statistics settle and agreement is not measured
between near-constant predictors) with learned weight steps and learned power-of-two
activation steps (``activation_scheme: lsq_pof2``, which stock QKeras and hls4ml express exactly),
exported with :func:`tfqkd.export.to_hls4ml` (Vitis backend; io_stream for the convolutional models,
io_parallel for the MLPs), its C++ emulation compiled with the system compiler, and its outputs
compared with the Keras model's on 300 test images: top-1 agreement and the largest logit difference
(and the Keras model's own top-1, so that agreement between near-constant predictors is visible)
(for ``fc_autoencoder``, a reconstruction model trained on flattened digits, the largest output
difference). Writes ``benchmarks/results/hls4ml_models.json``; a model hls4ml cannot take is a
result with its reason, not a crash.
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


from tfqkd.compat import keras
from tfqkd.atomic import write_text
from tfqkd.data import load_arrays
from tfqkd.errors import TfqkdError
from tfqkd.export.hls4ml import DEFAULT_PRECISION, to_hls4ml
from tfqkd.models import create_model
from tfqkd.quant import quantize

MODELS = ("kl_mlp_student", "dnn300", "fc_autoencoder", "resnet8", "ds_cnn", "mobilenet_v1_025", "densenet21")
VECTOR_MODELS = ("fc_autoencoder",)
EPOCHS = 5
CNN_FAMILIES = ("resnet", "ds_cnn", "mobilenet", "densenet")


def _policy(bits):
    return {"default": {"weight_bits": bits, "activation_bits": bits, "activation_scheme": "lsq_pof2"}}


def trained_student(name, bits, x, y):
    """A briefly trained ``name`` with ``bits``-bit learned weights and power-of-two activations."""
    keras.utils.set_random_seed(0)
    autoencoder = name in VECTOR_MODELS
    float_model = create_model(name, num_classes=None if autoencoder else 10, input_shape=x.shape[1:])
    model = quantize(float_model, _policy(bits), x[:256])
    loss = "mse" if autoencoder else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, x if autoencoder else y, epochs=EPOCHS, batch_size=64, verbose=0)
    return model


def measure(name, bits, work_dir):
    x, y = load_arrays("mnist5k", "train")
    x_test, y_test = load_arrays("mnist5k", "test", limit=300)
    if name in VECTOR_MODELS:
        x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
    io_type = "io_stream" if name.startswith(CNN_FAMILIES) else "io_parallel"
    row = {"model": name, "bits": bits, "io_type": io_type}
    start = time.perf_counter()
    model = trained_student(name, bits, x, y)
    try:
        result = to_hls4ml(model, Path(work_dir) / f"{name}_w{bits}", io_type=io_type, evaluation=x_test)
    except TfqkdError as err:
        return {**row, "error": str(err)}
    validation = result["validation"]
    expected = model.predict(x_test, verbose=0)
    if name in VECTOR_MODELS:
        row["max_abs_output_difference"] = validation["max_abs_logit_difference"]
        row["output_range"] = float(expected.max() - expected.min())
    else:
        # how far one epoch got: an agreement between two constant predictors would say nothing
        row["keras_top1"] = round(100.0 * float((expected.argmax(1) == y_test).mean()), 1)
        row.update(top1_agreement=validation["top1_agreement"], max_abs_logit_difference=validation["max_abs_logit_difference"])
    row.update(
        examples=validation["examples"], inexact_layers=len(result["inexact"]),
        compile_seconds=result["compile_seconds"], total_seconds=round(time.perf_counter() - start, 1),
    )  # fmt: skip
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfqkd_hls4ml_") as work_dir:
        for name in args.models:
            for bits in args.bits:
                row = measure(name, bits, work_dir)
                rows.append(row)
                print(json.dumps(row), flush=True)
    payload = {
        "what": __doc__.split("\n\n")[0],
        "machine": {"cpu": platform.processor() or platform.machine()},
        "backend": "Vitis",
        "default_precision": DEFAULT_PRECISION,
        "rows": rows,
    }
    write_text(args.out / "hls4ml_models.json", json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
