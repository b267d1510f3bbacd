"""Fuzzing the recipe front end: malformed recipes and arguments give one line and exit code 2.

Every case is generated deterministically from the packaged quick recipe (wrong types,
out-of-range values, deleted keys, random strings, nested garbage, malformed files) or
is an argument list, and is fed to ``tfqkd.recipes.qkd.main`` in-process. ``run_qkd`` is
replaced by a recorder, so a case that got past validation is reported instead of
training: every case must fail before any run directory, data or model is touched.
"""

import copy
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tfqkd.recipes.qkd as qkd
from tfqkd.recipes.config import SCHEDULES, budget_config

SEED = 20240501
GARBAGE = [{"nested": [1, {"x": None}]}, [[None]], "\x00garbage", float("nan"), -(10**40), {"": {"": []}}]
RANDOM_ALPHABET = "abcxyz019_-./:{}[]&*!|>%@` \t\u00e9\u4e2d"


def _base():
    return budget_config("quick", "mnist5k")


def _random_string(rng, n=None):
    return "".join(rng.choice(RANDOM_ALPHABET) for _ in range(n or rng.randint(1, 12))) + "?"


def _bad_policy_files(root):
    """Malformed POLICY.yaml files (each invalid on its own)."""
    texts = {
        "bits_high.yaml": "default: {weight_bits: 40}\n",
        "bits_zero.yaml": "default: {weight_bits: 0, activation_bits: 4}\n",
        "bits_float.yaml": "default: {weight_bits: 4.5}\n",
        "bits_str.yaml": "default: {weight_bits: four}\n",
        "kind.yaml": "default: {kind: magic}\n",
        "unknown_key.yaml": "defaults: {weight_bits: 4}\n",
        "rules_not_list.yaml": "rules: {match: x}\n",
        "rule_not_mapping.yaml": "rules: [3]\n",
        "rule_bad_regex.yaml": "rules: [{match: 're:(', weight_bits: 4}]\n",
        "rule_no_match.yaml": "rules: [{weight_bits: 4}]\n",
        "rule_bad_type.yaml": "rules: [{layer_type: Lambda, weight_bits: 4}]\n",
        "list.yaml": "- 1\n- 2\n",
        "scalar.yaml": "w4a4\n",
        "empty.yaml": "",
        "syntax.yaml": "default: {weight_bits: 4\n",
        "mixed_keys.yaml": "1: 2\ndefault: {}\n",
        "first_last.yaml": "first_last_bits: 99\n",
        "pof2.yaml": "default: {kind: pof2, weight_bits: 4}\n",
        "bomb.yaml": _bomb(),
    }
    paths = []
    for name, text in texts.items():
        (root / name).write_text(text)
        paths.append(root / name)
    (root / "latin1.yaml").write_bytes("default: {kind: caf\xe9}\n".encode("latin-1"))
    (root / "dir.yaml").mkdir()
    return paths + [root / "latin1.yaml", root / "dir.yaml", root / "missing.yaml"]


def _bomb(levels=9):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def _config_mutations(rng, policy_files):
    """(label, config) pairs, each config invalid by construction."""
    base = _base()
    cases = []

    def add(label, mutate):
        config = copy.deepcopy(base)
        mutate(config)
        cases.append((label, config))

    def setter(*path, value):
        def mutate(config):
            node = config
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value

        return mutate

    def deleter(*path):
        def mutate(config):
            node = config
            for key in path[:-1]:
                node = node[key]
            del node[path[-1]]

        return mutate

    common_bad = ["abc", [1], {"a": 1}, True, float("nan"), float("inf"), float("-inf"), 10**30, -(10**30), "1"]
    numbers = {
        "seed": [-1, 2**32, 1.5, None],
        "batch_size": [0, -1, 65537, 2.0, None],
        "alpha": [-0.01, 1.01, 2, None],
        "temperature": [0, -1.0, 1e5, None],
        "weight_decay": [-1e-4, 2, None],
        "momentum": [-0.1, 1.5, None],
        "eval_train_limit": [0, -5, 1.5, 10**12],
        "train_limit": [0, -1, 2.5],
    }
    for key, values in numbers.items():
        for value in values + common_bad:
            add(f"{key}={value!r}", setter(key, value=value))
    for key in ("dataset", "student", "teacher"):
        for value in ("nope", "", 7, ["mnist"], None, {"name": "mnist"}, _random_string(rng), "MNIST5K "):
            add(f"{key}={value!r}", setter(key, value=value))
        add(f"del {key}", deleter(key))
    add("student=fc_autoencoder", setter("student", value="fc_autoencoder"))
    add("teacher=fc_autoencoder", setter("teacher", value="fc_autoencoder"))
    for value in ("w3a3", "", 8, [8], None, "nope.yml", {"default": {"weight_bits": 99}}, {"rules": "x"}, {7: 1}):
        add(f"quant={value!r}", setter("quant", value=value))
    for path in policy_files:
        add(f"quant file {path.name}", setter("quant", value=str(path)))
    for value in ("maybe", 1, None, ["on"], True):
        add(f"teacher_cache={value!r}", setter("teacher_cache", value=value))
    for value in (3, ["a"], "", "a\x00b", {"d": 1}):
        add(f"data_dir={value!r}", setter("data_dir", value=value))
    for value in (3, ["quick"]):
        add(f"name={value!r}", setter("name", value=value))
    # Stages: wrong nesting, missing and unknown stages and keys, bad schedule values.
    for value in (None, [], ["ss"], "ss", 5, {"ss": None}):
        add(f"schedules={value!r}", setter("schedules", value=value))
    add("del schedules", deleter("schedules"))
    for stage in SCHEDULES:
        add(f"del {stage}", deleter("schedules", stage))
        add(f"{stage}=list", setter("schedules", stage, value=[1, 0.1]))
        add(f"{stage}=str", setter("schedules", stage, value="fast"))
        add(f"del {stage}.epochs", deleter("schedules", stage, "epochs"))
        add(f"del {stage}.lr", deleter("schedules", stage, "lr"))
        add(f"{stage}.unknown", setter("schedules", stage, "lr_max", value=1))
    schedule_bad = {
        "epochs": [-1, 1.5, "2", 10**9, float("nan"), None],
        "lr": [0, -1, float("inf"), float("nan"), 1e7, "fast", None],
        "milestones": ["1", [1, "a"], [3, 1], [2, 2], [-1], 5, {"at": 1}, [1.5]],
        "factor": [0, -5, float("nan"), float("inf"), "x", None],
        "warmup": [-1, 0.5, "x", None, 10**9],
    }
    for key, values in schedule_bad.items():
        for value in values:
            stage = rng.choice(SCHEDULES)
            add(f"{stage}.{key}={value!r}", setter("schedules", stage, key, value=value))
    add("unknown stage", setter("schedules", "kd", value={"epochs": 1, "lr": 0.1}))
    # Unknown and odd top-level keys.
    for key in ("epochs", "lr", "Dataset", 3, _random_string(rng), "stage", "a\nb"):
        add(f"unknown key {key!r}", setter(key, value=1))
    add("nested garbage key", setter("extra", value={"deep": [{"deeper": [1, 2, {"x": None}]}]}))
    # Random garbage at random leaves (never a 'name', the only free-text setting).
    leaves = [("schedules", s, k) for s in SCHEDULES for k in ("epochs", "lr", "milestones", "factor", "warmup")]
    leaves += [(k,) for k in base if k not in ("name", "schedules", "eval_train_limit")]
    for i in range(40):
        path = rng.choice(leaves)
        add(f"garbage {i} at {'.'.join(path)}", setter(*path, value=rng.choice(GARBAGE)))
    return cases


def _bad_recipe_files(root, rng):
    """Malformed recipe files that cannot be written as a mapping: raw text and bytes."""
    valid = yaml.safe_dump(_base(), sort_keys=False)
    files = {
        "list.yaml": "- dataset: mnist5k\n- student: densenet21\n",
        "scalar.yaml": "quick\n",
        "number.yaml": "42\n",
        "null.yaml": "null\n",
        "empty.yaml": "",
        "comment_only.yaml": "# nothing\n",
        "syntax.yaml": "dataset: mnist5k\nstudent: [densenet21\n",
        "tabs.yaml": "dataset:\n\t- mnist5k\n",
        "two_documents.yaml": valid + "---\n" + valid,
        "python_tag.yaml": "dataset: !!python/object/apply:os.system ['touch CANARY']\n",
        "bad_timestamp.yaml": valid + "stamp: 2020-13-45\n",
        "binary.yaml": valid.replace("mnist5k", "!!binary aGVsbG8="),
        "bad_binary.yaml": "dataset: !!binary '%%%'\n",
        "duplicate_anchor_bomb.yaml": _bomb(),
        "bomb_in_stages.yaml": _bomb(8) + valid.replace("schedules:", "schedules_: *a7\nschedules:"),
        "recursive.yaml": "a: &x [*x]\n" + valid,
        "recursive_map.yaml": "a: &x {b: *x}\n" + valid,
        "deep.yaml": "x: " + "[" * 5000 + "]" * 5000 + "\n",
        "deep_map.yaml": "x: " + "{a: " * 100 + "1" + "}" * 100 + "\n",
        "huge.yaml": valid + "pad: '" + "x" * (1 << 21) + "'\n",
        "unhashable_key.yaml": "? [a, b]\n: 1\n",
        "indent.yaml": "dataset: mnist5k\n  student: densenet21\n",
        "nul.yaml": valid + "\x00\n",
        "control.yaml": valid + "x: \x07\n",
        "many_aliases.yaml": "a: &a 1\nb: [" + ", ".join(["*a"] * 1000) + "]\n",
    }
    paths = []
    for name, text in files.items():
        (root / name).write_text(text)
        paths.append(root / name)
    for name, payload in (
        ("latin1.yaml", valid.replace("mnist5k", "mnist5k\xe9").encode("latin-1")),
        ("utf16.yaml", valid.encode("utf-16")),
        ("random.yaml", random.Random(SEED).randbytes(2048)),
        ("gzip.yaml", b"\x1f\x8b\x08\x00" + random.Random(1).randbytes(64)),
    ):
        (root / name).write_bytes(payload)
        paths.append(root / name)
    return paths


def _argv_cases(root, rng, policy_files):
    """Argument lists, each with at least one bad argument."""
    afile = root / "a_file.txt"
    afile.write_text("not a directory\n")
    adir = root / "a_dir"
    adir.mkdir()
    bad = [
        ["--batch-size", "0"], ["--batch-size", "-8"], ["--batch-size", "abc"], ["--batch-size", "1e3"],
        ["--batch-size", "99999999999"], ["--batch-size", ""], ["--seed", "-1"], ["--seed", "x"],
        ["--seed", str(2**40)], ["--alpha", "1.5"], ["--alpha", "-0.1"], ["--alpha", "nan"], ["--alpha", "inf"],
        ["--alpha", "abc"], ["--alpha", "0.5\n1"], ["--temperature", "0"], ["--temperature", "-1"],
        ["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "1e400"], ["--model", "nope"],
        ["--model", "fc_autoencoder"], ["--teacher", "nope\nmore"], ["--dataset", "imagenet"], ["--dataset", ""],
        ["--budget", "huge"], ["--budget", "thesis", "--dataset", "digits"], ["--quant", "w3a3"],
        ["--quant", ""], ["--quant", str(root / "missing.yaml")], ["--config", str(root / "missing.yaml")],
        ["--config", str(adir)], ["--config", ""], ["--config", "a\x00b"], ["--teacher-model", str(root / "t.h5")],
        ["--student-model", str(adir)], ["--teacher-model", ""], ["--run-dir", str(afile)],
        ["--run-dir", str(afile / "sub")], ["--run-dir", ""], ["--run-dir", "  "], ["--data-dir", str(afile)],
        ["--bogus"], ["--bogus=1"], ["positional"], ["a\nb"], ["--batch-size"], ["--model"], ["--seed", "1", "extra"],
        ["--alpha=--1"], ["-x"], ["--unsafe=yes"],
    ]  # fmt: skip
    cases = [(f"argv {args!r}", args) for args in bad]
    cases += [(f"argv --quant {p.name}", ["--quant", str(p)]) for p in policy_files]
    good = [["--seed", "3"], ["--batch-size", "32"], ["--alpha", "0.5"], ["--temperature", "4"], ["--model", "dnn30"],
            ["--teacher", "dnn300"], ["--dataset", "digits"], ["--quant", "w4a4"], ["--budget", "quick"],
            ["--unsafe"], ["--run-dir", str(root / "run")]]  # fmt: skip
    for i in range(40):
        wrong = rng.choice(bad)
        flags = {arg.split("=")[0] for arg in wrong if arg.startswith("--")}
        if "--budget" in flags or "--dataset" in flags:
            flags |= {"--budget", "--dataset"}
        usable = [g for g in good if g[0] not in flags]  # a later good value would override the bad one
        args = []
        for extra in rng.sample(usable, rng.randint(0, 3)):
            args += extra
        position = rng.randint(0, len(args) // 2) * 2
        args[position:position] = wrong
        cases.append((f"argv combo {i} {args!r}", args))
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(SEED)
    (root / "policies").mkdir()
    policy_files = _bad_policy_files(root / "policies")
    out = []
    for i, (label, config) in enumerate(_config_mutations(rng, policy_files)):
        path = root / f"recipe_{i:03d}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        out.append((f"recipe {label}", ["--config", str(path)]))
    (root / "files").mkdir()
    out += [(f"file {p.name}", ["--config", str(p)]) for p in _bad_recipe_files(root / "files", rng)]
    out += _argv_cases(root, rng, policy_files)
    unique = {}
    for label, argv in out:
        unique.setdefault(tuple(argv), (label, argv))
    return list(unique.values())


def _run(argv, capsys):
    try:
        code = qkd.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_at_least_200_distinct_cases(cases):
    assert len(cases) >= 200
    assert len({tuple(argv) for _, argv in cases}) == len(cases)


def test_malformed_recipes_and_arguments_give_one_line_and_exit_2(cases, capsys, monkeypatch, tmp_path):
    trained, current = [], [None]
    monkeypatch.setattr(qkd, "run_qkd", lambda config, run_dir, *a, **k: trained.append(current[0]))
    monkeypatch.chdir(tmp_path)  # a case that slipped through must not create ./runs in the repository
    failures = []
    for label, argv in cases:
        current[0] = label
        code, out, err = _run(argv, capsys)
        lines = err.splitlines()
        problem = None
        if "Traceback" in out + err:
            problem = "traceback"
        elif code != 2:
            problem = f"exit code {code!r}"
        elif len(lines) != 1 or ": error: " not in lines[0]:
            problem = f"stderr is not one error line: {err!r}"
        elif out:
            problem = f"stdout not empty: {out!r}"
        if problem:
            failures.append(f"{label}: {problem}")
    assert not trained, f"malformed cases reached training: {trained[:10]}"
    assert not failures, "\n".join(failures[:20])
    assert not (tmp_path / "runs").exists()


def test_control_case_reaches_training(capsys, monkeypatch, tmp_path):
    """The harness itself: a valid argument list does get past validation."""
    trained = []
    monkeypatch.setattr(qkd, "run_qkd", lambda config, run_dir, *a, **k: trained.append((config, run_dir)))
    code, out, err = _run(["--model", "dnn30", "--teacher", "dnn300", "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 0 and err == "" and len(trained) == 1
    assert trained[0][0]["student"] == "dnn30" and not (tmp_path / "r").exists()


_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IWEF]\d{4} \d\d:\d\d:\d\d)")


def test_end_to_end_subprocesses_print_no_traceback(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: {weight_bits: 40}\n")
    # Two processes (each imports TensorFlow, seconds on a shared 2-core machine): a file-level
    # error (an alias bomb) and a value-level one (an out-of-range policy next to a NaN alpha).
    runs = {
        "bomb": ["--config", str(bomb), "--run-dir", str(tmp_path / "run")],
        "policy": ["--quant", str(policy), "--alpha", "nan", "--run-dir", str(tmp_path / "run")],
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tfqkd.recipes.qkd", *args], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name, args in runs.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert "Traceback" not in out + err, name
        assert proc.returncode == 2, (name, err)
        lines = [line for line in err.splitlines() if not _TF_NOISE.match(line)]
        assert len(lines) == 1 and ": error: " in lines[0], (name, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    assert not Path(tmp_path / "CANARY").exists()
