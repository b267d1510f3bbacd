"""The README main job's student as an int8 TFLite file, per runtime, with and without integer_intermediates (issue 17).

    python benchmarks/readme_student_export.py [--tflite-runtime-python VENV/bin/python]

Runs the README main job (``python -m tfqkd.recipes.qkd --model densenet21``, the quick budget) as
the README does (w8a8) and with ``--quant`` a policy that adds ``integer_intermediates: true``;
exports each exported student with ``tfqkd export --target tflite RUN --format int8`` (the default
file: float32 logits) and with ``--logits int8`` (full integer), validated on LiteRT, tf.lite,
LiteRT's built-in kernels and tflite-runtime (2.14 in its own numpy<2 venv, given with
``--tflite-runtime-python``); and, for the runtime comparison, TensorFlow's own post-training int8
file of the run's float student. The same commands a user types, in subprocesses. Writes
``results/readme_student_export.json`` (about 10 minutes on 2 cores).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)
from int8_fidelity import converter_between_runtimes  # this folder's benchmark: the same yardstick
from tfqkd.bench.report import write_json
from tfqkd.data import load_arrays
from tfqkd.io import load_model

POLICIES = {
    "w8a8": None,  # the README's main job as it is
    "w8a8 integer_intermediates": "default: {weight_bits: 8, activation_bits: 8}\ninteger_intermediates: true\n",
}
_FIGURES = ("agreement", "max_output_steps", "max_logit_difference", "tflite_top1")


def _run(command):
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def _export(run, out, runtimes, logits):
    _run([sys.executable, "-m", "tfqkd.cli", "export", "--target", "tflite", str(run), "--format", "int8", "--out", str(out),
          "--runtimes", runtimes, "--logits", logits])  # fmt: skip
    report = json.loads(next(Path(out).glob("*_int8.tflite.validation.json")).read_text())
    return {
        "runtimes": {label: {key: figures[key] for key in _FIGURES} for label, figures in report["runtimes"].items()},
        "between_runtimes": report.get("between_runtimes", {}),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tflite-runtime-python", default=None,
                        help="Python of a venv with tflite-runtime (e.g. 2.14 and numpy<2)")  # fmt: skip
    args = parser.parse_args(argv)
    runtimes = "litert,tensorflow,litert-builtin," + (
        f"tflite-runtime={args.tflite_runtime_python}" if args.tflite_runtime_python else "tflite-runtime"
    )
    data, test = load_arrays("mnist5k", "train"), load_arrays("mnist5k", "test")
    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as workdir:
        for label, policy in POLICIES.items():
            run = Path(workdir) / label.replace(" ", "_")
            command = [sys.executable, "-m", "tfqkd.recipes.qkd", "--model", "densenet21", "--run-dir", str(run)]
            if policy:
                policy_file = Path(workdir) / "policy.yaml"
                policy_file.write_text(policy)
                command += ["--quant", str(policy_file)]
            began = time.time()
            _run(command)
            results = json.loads((run / "results.json").read_text())["results"]
            row = {
                "policy": label,
                "recipe_seconds": round(time.time() - began, 1),
                "table": {r["method"]: r["test_top1"] for r in results},
                "exported": next(r["method"] for r in results if r.get("exported")),
                "default_file": _export(run, run / "export_default", runtimes, "auto"),
                "full_integer_file": _export(run, run / "export_int8", runtimes, "int8"),
            }
            if policy is None:  # TensorFlow's converter on the same run's float student
                float_student = load_model(run / "models" / "student_fp.h5")
                row["converter_ptq_between_runtimes"] = converter_between_runtimes(float_student, data, test, runtimes,
                                                                                   workdir)  # fmt: skip
            rows.append(row)
            print(json.dumps({key: row[key] for key in ("policy", "table", "default_file")})[:600], flush=True)
    payload = {
        "what": "the README main job's exported student as an int8 TFLite file vs its Keras model, per runtime "
        "(issue 17); 1,000 mnist5k test images",
        "command": "python benchmarks/readme_student_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.time() - start, 1),
        "runs": rows,
    }
    write_json(Path(args.out) / "readme_student_export.json", payload)
    print(f"wrote {Path(args.out) / 'readme_student_export.json'}")


if __name__ == "__main__":
    main()
