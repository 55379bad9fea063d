"""The ``ezsasrec`` command line: every subcommand's flags come from its stage's config class
(ezsasrec_ray.options), so the CLI, the library and the pipeline's YAML share one set of
defaults, and ``--help`` shows each flag's help and default. No Ray, no TensorFlow."""

import ast
import copy
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ezsasrec_ray import cli
from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.evaluate import EvaluateConfig
from ezsasrec_ray.export import ExportConfig
from ezsasrec_ray.options import check_values, defaults, from_namespace
from ezsasrec_ray.pipeline import GATE_KEYS, Pipeline, section_classes, section_keys
from ezsasrec_ray.prepare import PrepareConfig
from ezsasrec_ray.score import ScoreConfig
from ezsasrec_ray.serve import ServeConfig
from ezsasrec_ray.synth import SynthConfig
from ezsasrec_ray.train import LOSS_NAMES, TrainConfig
from ezsasrec_ray.tune import TuneConfig

ROOT = Path(__file__).resolve().parents[1]

# subcommand -> (its config class, the fewest arguments it takes, fields without a flag)
MINIMAL = {
    "synth": (SynthConfig, ["--output", "o"], ()),
    "prepare": (PrepareConfig, ["--input", "i", "--output", "o"], ()),
    "train": (TrainConfig, ["--data", "d", "--output", "o"], ()),
    "evaluate": (EvaluateConfig, ["--data", "d", "--model", "m"], ()),
    "score": (ScoreConfig, ["--data", "d", "--model", "m", "--output", "o"], ()),
    "serve": (ServeConfig, ["--model", "m"], ("api_key", "batch_wait_timeout_s")),
    "tune": (TuneConfig, ["--data", "d", "--output", "o"], ()),
    "export": (ExportConfig, ["--model", "m", "--output", "o"], ()),
}
REQUIRED = {"--data", "--model", "--output", "--input", "-h"}


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(command, "--help")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help line(s) in ``--help`` output (metavar included), one line."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line[match.end():]
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


# --------------------------------------------------------------------------------------------
# One set of defaults


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_cli_defaults_are_the_config_defaults(command):
    cls, argv, no_flag = MINIMAL[command]
    args = parse(command, *argv)
    expected = defaults(cls)
    for name, default in expected.items():
        if name in no_flag:
            assert not hasattr(args, name), name
            continue
        assert getattr(args, name) == default, (command, name)
        assert type(getattr(args, name)) is type(default), (command, name)
    missing = {name for name in expected if not hasattr(args, name)} - set(no_flag)
    assert not missing, missing
    if command == "serve":
        assert args.batch_wait_ms / 1000.0 == expected["batch_wait_timeout_s"]
    if command != "serve":  # ServeConfig checks that the model directory exists
        config = from_namespace(cls, args)  # what the CLI builds before calling the stage
        assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "score"])
def test_pipeline_accepts_the_same_defaults(stage):
    cls = section_classes()[stage]
    keys = section_keys()[stage]
    expected = {k: v for k, v in defaults(cls).items() if k in keys}
    assert set(keys) - set(expected) <= {"input"}  # prepare's input is required
    section = copy.deepcopy(expected)
    assert check_values(cls, section, source="p.yaml: " + stage) == expected
    # the defaults a stage's fingerprint is computed with are these same values
    with_defaults = Pipeline._with_defaults(cls, {})
    assert {k: with_defaults[k] for k in expected} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    command = {"prepare": "prepare", "train": "train", "evaluate": "evaluate",
               "score": "score"}[stage]
    args = parse(command, *MINIMAL[command][1])
    # the gate and the warm start are the pipeline's own keys
    cli_keys = [k for k in expected if k not in (*GATE_KEYS, "warm_start")]
    assert {k: getattr(args, k) for k in cli_keys} == {k: expected[k] for k in cli_keys}


def test_example_config_values_are_the_defaults():
    example = yaml.safe_load((ROOT / "jobs" / "config.example.yaml").read_text())
    documented = {("prepare", "input"), ("prepare", "k_core")}  # its comments say why
    for stage, cls in section_classes().items():
        expected = defaults(cls)
        for key, value in example[stage].items():
            if (stage, key) not in documented:
                default = expected[key]
                assert value == (list(default) if isinstance(default, tuple) else default), \
                    (stage, key)


def test_loss_choices_are_the_registered_losses():
    tree = ast.parse((ROOT / "ezsasrec_ray" / "losses.py").read_text())
    registered = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                      and any(getattr(t, "id", None) == "LOSSES" for t in node.targets))
    assert {key.value for key in registered.keys} == set(LOSS_NAMES)


# --------------------------------------------------------------------------------------------
# --help


def test_train_help_shows_defaults_and_help(capsys):
    entries = help_entries(help_text("train", capsys))
    for flag, default in {"--epochs": "200", "--lr": "0.001", "--batch-size": "128",
                          "--dim": "64", "--dropout": "0.2", "--patience": "3",
                          "--maxlen": "50"}.items():
        assert f"(default: {default})" in entries[flag], (flag, entries[flag])
    assert "XLA" in entries["--xla"]
    assert "lazy_adam updates only the item rows" in entries["--optimizer"]
    assert "--num-workers" in entries["--lr-scaling"]
    assert "sampled negatives" in entries["--negatives"]
    assert "{bce,sampled_softmax,softmax,gbce}" in entries["--loss"]


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_every_flag_has_help_and_a_default(command, capsys):
    entries = help_entries(help_text(command, capsys))
    for flag, text in entries.items():
        if flag in REQUIRED:
            continue
        assert "default:" in text, (command, flag, text)
        words = re.sub(r"\(?default:.*", "", text).split()
        assert len(words) >= 2, (command, flag, text)  # a metavar alone is no help


def test_evaluate_options_all_have_help(capsys):
    entries = help_entries(help_text("evaluate", capsys))
    for flag in ("--split", "--protocol", "--k", "--batch-size", "--num-negatives",
                 "--negative-sampling", "--seed", "--baselines", "--holdout", "--include-seen",
                 "--json"):
        assert flag in entries, flag
        assert len(re.sub(r"\(default:.*", "", entries[flag]).split()) >= 3, entries[flag]
    assert "--k K [K ...]" in help_text("evaluate", capsys)


def test_help_loads_no_tensorflow_and_the_top_level_help_no_stage():
    code = ("import sys; import ezsasrec_ray.cli as c, ezsasrec_ray.train; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow'; "
            "sys.modules.pop('ezsasrec_ray.serve', None); "
            "c.build_parser().format_help(); "
            "assert 'ezsasrec_ray.serve' not in sys.modules, 'serve'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Flags kept as they were


def test_hand_written_flags_keep_their_behaviour(tmp_path, capsys):
    base = MINIMAL["prepare"][1]
    assert parse("prepare", *base, "--header", "true").header is True
    assert parse("prepare", *base, "--header", "no").header is False
    assert parse("prepare", *base).header is None
    args = parse("prepare", *base, "--k-core", "3", "--user-col", "0")
    config = from_namespace(PrepareConfig, args)
    assert (config.min_user, config.min_item, config.user_col) == (3, 3, "0")
    assert parse("evaluate", *MINIMAL["evaluate"][1], "--include-seen").exclude_seen is False
    assert parse("evaluate", *MINIMAL["evaluate"][1], "--k", "5", "10").ks == [5, 10]
    assert parse("score", *MINIMAL["score"][1], "--include-seen").include_seen is True
    args = parse("train", *MINIMAL["train"][1], "--use-gpu", "--xla", "--overwrite")
    assert args.use_gpu and args.xla and args.overwrite
    model = str(tmp_path)
    args = parse("serve", "--model", model, "--batch-wait-ms", "20", "--replicas", "2")
    config = from_namespace(ServeConfig, args, batch_wait_timeout_s=args.batch_wait_ms / 1000.0)
    assert config.batch_wait_timeout_s == 0.02 and args.replicas == 2
    assert args.address is None and args.port == 8000 and args.host == "127.0.0.1"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", "m", "--replicas", "2", "--autoscale", "1:2"], "not allowed with"),
    (["train", "--data", "d", "--output", "o", "--epochs", "0"],
     "argument --epochs: must be >= 1, got 0"),
    (["train", "--data", "d", "--output", "o", "--loss", "mse"],
     "argument --loss: invalid choice: 'mse'"),
    (["score", "--data", "d", "--model", "m", "--output", "o", "--top-n", "0"],
     "argument --top-n: must be >= 1, got 0"),
    (["evaluate", "--data", "d", "--model", "m", "--k", "0"], "argument --k: must be >= 1"),
    (["prepare", "--input", "i", "--output", "o", "--split", "random"],
     "argument --split: invalid choice: 'random'"),
    (["synth", "--output", "o", "--noise", "2"], "argument --noise: must be <= 1, got 2.0"),
    (["train", "--output", "o"], "the following arguments are required: --data"),
])
def test_bad_flags_fail_in_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


STAGE_FUNCTIONS = {"synth": ("synth", "synth"), "prepare": ("prepare", "prepare"),
                   "train": ("train", "train"), "evaluate": ("evaluate", "evaluate"),
                   "score": ("score", "recommend"), "serve": ("serve", "run_server"),
                   "tune": ("tune", "tune"), "export": ("export", "export")}
# what the faked stage functions return: enough for every command's closing line
FAKE_RESULT = {"valid": {"NDCG@10": 0.0, "HR@10": 0.0}, "best_epoch": 1, "trials": 1,
               "stopped_by_scheduler": 0, "tune_seconds": 0.0, "searched": {},
               "signatures": {}, "maxlen": 1, "dim": 1}


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_run_passes_every_option_to_the_stage(command, monkeypatch, tmp_path, capsys):
    cls, argv, _ = MINIMAL[command]
    if command == "serve":
        argv = ["--model", str(tmp_path)]  # ServeConfig checks that the directory exists
    module_name, name = STAGE_FUNCTIONS[command]
    module = importlib.import_module(f"ezsasrec_ray.{module_name}")
    signature = inspect.signature(getattr(module, name))
    calls = []

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments  # a call the real function takes
        options = {k: v for k, v in bound.items()
                   if signature.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}
        for k, p in signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                options.update(bound.get(k, {}))
        calls.append(options)
        return dict(FAKE_RESULT)

    monkeypatch.setattr(module, name, fake)
    # tune: --no-refit, else the real train would run after the faked search
    extra = {"evaluate": ["--json"], "tune": ["--no-refit"]}.get(command, [])
    assert cli.run(parse(command, *argv, *extra)) == 0
    expected = {**defaults(cls), **({"refit": False} if command == "tune" else {})}
    given = {k: v for k, v in calls[0].items() if k in expected}
    assert given == expected
    if command in ("prepare", "serve"):
        assert calls[0].get("input", calls[0].get("model")) == argv[1]


def test_cross_field_checks_name_the_flag():
    args = parse("train", *MINIMAL["train"][1], "--optimizer", "lazy_adam", "--xla")
    with pytest.raises(EzSASRecError, match="--optimizer lazy_adam: not with --xla"):
        from_namespace(TrainConfig, args)
    args = parse("prepare", *MINIMAL["prepare"][1], "--split", "time")
    with pytest.raises(EzSASRecError, match="--split time needs --cutoff"):
        from_namespace(PrepareConfig, args)
    args = parse("synth", "--output", "o", "--events", "10")
    with pytest.raises(EzSASRecError, match="--events 10 is too few"):
        from_namespace(SynthConfig, args)


def test_docs_options_is_generated_from_the_parser():
    """docs/options.md is the parser's own listing; regenerate it with
    ``python -m ezsasrec_ray.cli --options-reference > docs/options.md``."""
    import pathlib

    from ezsasrec_ray.cli import options_reference

    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "options.md"
    assert path.read_text().rstrip("\n") == options_reference().rstrip("\n")
