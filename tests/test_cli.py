"""The ``tfqkd`` command line: listing, one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from tfqkd.cli import main


def test_models_lists_family_with_params_and_macs(capsys):
    assert main(["models", "--family", "mlp"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("kl_mlp_student"))
    assert "328,810" in row and "mlp" in row
    assert "dnn1200" in out and "2,395,210" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["models", "--family", "nope"], "unknown"),
        (["frobnicate"], "invalid choice"),
        (["train", "nosuchrecipe"], "invalid choice"),
        (["export", "--target", "dpu", "/no/such/run"], "no such run directory or model file"),
        (["export", "--target", "tflite", "/no/such/run"], "no such run directory or model file"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_console_script_error_has_no_traceback(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("default: {weight_bits: 17, activation_bits: 4}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tfqkd.recipes.qkd", "--quant", str(policy), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("tfqkd")]
    assert len(lines) == 1 and lines[0].startswith("tfqkd.recipes.qkd: error: ")
    assert "weight_bits must be an integer in [1, 16], got 17" in lines[0]
    assert not (tmp_path / "run").exists()  # rejected before anything is written
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [
    ["export", "--target", "tflite", "--dataset", "digits"],
    ["bench", "--backends", "keras_fp32"],
    ["analyze", "--data", "digits"],
])  # fmt: skip
@pytest.mark.parametrize("out", ["/proc/tfqkd-nope", "/sys/tfqkd-nope/deeper"])
def test_unwritable_output_directory_is_one_line_and_creates_nothing(tmp_path, capsys, command, out):
    import tfqkd

    model = tfqkd.create_model("kl_mlp_student", num_classes=10, input_shape=(8, 8, 1), quant="w8a8")
    path = tmp_path / "model.h5"
    model.save(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [command[0], str(path), *command[1:], "--out", out]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be written" in lines[0] and repr(out) in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_subpackages_are_attributes_after_import_tfqkd():
    code = "import tfqkd; print(tfqkd.export.to_tflite.__name__, tfqkd.export.to_dpu.__name__, tfqkd.bench.sweep.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["to_tflite", "to_dpu", "sweep"]
