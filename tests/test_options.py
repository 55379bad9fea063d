"""ezsasrec_ray.options: flags, YAML checks and instance checks derived from a dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from ezsasrec_ray.errors import EzSASRecError
from ezsasrec_ray.options import (
    add_arguments,
    check_instance,
    check_values,
    defaults,
    from_namespace,
    markdown_table,
    option,
    yaml_example,
    yaml_keys,
)


@dataclass
class Toy:
    data: str = option(dataclasses.MISSING, "prepared-dataset directory")
    epochs: int = option(20, "passes over the data", min=1)
    lr: float = option(1e-3, "learning rate (100% per epoch)", min=0.0, max=10.0)
    loss: str = option("softmax", "training loss", choices=("bce", "softmax", "gbce"))
    holdout: str | None = option(None, "targets kept out", choices=("valid", "test"))
    use_gpu: bool = option(False, "train on GPUs")
    verbose: bool = option(True, "print progress")
    header: bool | None = option(None, "text has a header line (default: detected)")
    budget_s: float | None = option(None, "stop after this much time", min=0)
    user_col: str | None = option(None, "user column name or position")
    ks: tuple[int, ...] = option((1, 5, 10), "cutoffs", min=1, flag="--k")
    cutoff: Any = option(None, "unix time or ISO-8601")
    seed: int = 0  # a plain field: a flag and a key, with no help
    output: str = option("out", "where to write", yaml=False)
    callback: object = option(None, "a Python object", cli=False, yaml=False)
    tags: list = field(default_factory=list)  # no option(): no flag

    def __post_init__(self):
        check_instance(self)


def parser_for(cls=Toy, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, cls, **kwargs)
    return parser


def parse_error(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The command line


def test_parser_defaults_are_the_dataclass_defaults():
    args = parser_for().parse_args(["--data", "d"])
    expected = defaults(Toy)
    for name in ("epochs", "lr", "loss", "holdout", "use_gpu", "verbose", "header", "budget_s",
                 "user_col", "ks", "cutoff", "seed", "output"):
        assert getattr(args, name) == expected[name], name
    assert args.data == "d"
    assert not hasattr(args, "callback") and not hasattr(args, "tags")


def test_defaults_and_yaml_keys():
    assert defaults(Toy)["epochs"] == 20 and defaults(Toy)["tags"] == []
    assert "data" not in defaults(Toy)
    keys = yaml_keys(Toy)
    assert keys[:3] == ("data", "epochs", "lr")
    assert "output" not in keys and "callback" not in keys and "tags" in keys


def test_help_shows_each_help_line_and_default(capsys):
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "passes over the data (default: 20)" in text
    assert "learning rate (100% per epoch) (default: 0.001)" in text
    assert "training loss (default: softmax)" in text
    assert "train on GPUs (default: False)" in text
    assert "print progress (default: True)" in text
    assert "cutoffs (default: 1 5 10)" in text
    assert "(default: 0)" in text  # seed: no help, still its default
    assert "targets kept out" in text and "targets kept out (default" not in text
    assert "(default: detected)" in text and "detected) (default" not in text
    assert "--use-gpu, --no-use-gpu" in text and "--k K [K ...]" in text
    assert "{bce,softmax,gbce}" in text


def test_required_and_positional(capsys):
    assert "required: --data" in parse_error(parser_for(), [], capsys)
    args = parser_for(positional=("data",)).parse_args(["dir", "--epochs", "3"])
    assert (args.data, args.epochs) == ("dir", 3)


def test_skip_and_only():
    args = parser_for(skip=("epochs",)).parse_args(["--data", "d"])
    assert not hasattr(args, "epochs")
    args = parser_for(only=("epochs", "lr")).parse_args([])
    assert vars(args) == {"epochs": 20, "lr": 1e-3}


def test_bool_flags():
    parser = parser_for()
    args = parser.parse_args(["--data", "d", "--use-gpu", "--no-verbose"])
    assert args.use_gpu is True and args.verbose is False
    assert parser.parse_args(["--data", "d", "--header"]).header is True
    assert parser.parse_args(["--data", "d", "--no-header"]).header is False
    assert parser.parse_args(["--data", "d"]).header is None


def test_flag_values_are_typed():
    args = parser_for().parse_args(["--data", "d", "--lr", "0.5", "--k", "1", "20",
                                    "--budget-s", "60", "--user-col", "0", "--cutoff", "2020"])
    assert args.lr == 0.5 and args.ks == [1, 20] and args.budget_s == 60.0
    assert args.user_col == "0" and args.cutoff == "2020"


@pytest.mark.parametrize("argv, message", [
    (["--use-gpu=1"], "ignored explicit argument"),
    (["--header", "true"], "unrecognized arguments: true"),
    (["--loss", "mse"], "argument --loss: invalid choice: 'mse'"),
    (["--holdout", "none"], "argument --holdout: invalid choice: 'none'"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
    (["--lr", "11"], "argument --lr: must be <= 10.0, got 11.0"),
    (["--k", "5", "0"], "argument --k: must be >= 1, got 0"),
])
def test_flag_errors(argv, message, capsys):
    assert message in parse_error(parser_for(), ["--data", "d", *argv], capsys)


def test_unsupported_type_needs_cli_false():
    @dataclass
    class Bad:
        fn: object = option(None, "a callable")

    with pytest.raises(TypeError, match="Bad.fn: .*cli=False"):
        parser_for(Bad)


def test_bad_default_is_caught_at_declaration():
    with pytest.raises(ValueError, match="must be one of a, b"):
        option("c", "x", choices=("a", "b"))
    with pytest.raises(ValueError, match="must be >= 1"):
        option(0, "x", min=1)


def test_from_namespace_round_trip():
    argv = ["--data", "d", "--epochs", "3", "--loss", "bce", "--use-gpu", "--k", "10"]
    namespace = parser_for().parse_args(argv)
    namespace.command = "train"  # not a field: ignored
    config = from_namespace(Toy, namespace, output="elsewhere")
    assert config == Toy(data="d", epochs=3, loss="bce", use_gpu=True, ks=[10],
                         output="elsewhere")
    assert from_namespace(Toy, parser_for().parse_args(["--data", "d"])) == Toy(data="d")


# --------------------------------------------------------------------------------------------
# Config file sections


def check(values: dict) -> dict:
    return check_values(Toy, values, source="p.yaml: train")


def test_check_values_accepts_and_normalizes():
    values = {"epochs": 3, "lr": 1, "holdout": None, "header": None, "user_col": 0,
              "ks": 10, "cutoff": "2020-01-01", "use_gpu": True}
    assert check(values) is values
    assert values["lr"] == 1  # an int is a float
    assert values["user_col"] == "0"  # a column by position
    assert values["ks"] == [10]
    assert check({"lr": "1e-3"})["lr"] == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert check({}) == {}


def test_unknown_key_lists_known_keys():
    with pytest.raises(EzSASRecError) as err:
        check({"epoch": 3})
    message = str(err.value)
    assert message.startswith("p.yaml: train: unknown key 'epoch'; known: data, epochs, lr,")
    assert "output" not in message and "callback" not in message


def test_key_kept_out_of_yaml():
    with pytest.raises(EzSASRecError, match=r"p.yaml: train: 'output' cannot be set here; "
                                            r"known: data, epochs"):
        check({"output": "x"})


@pytest.mark.parametrize("key, value, message", [
    ("epochs", True, "p.yaml: train.epochs must be an integer, got True"),
    ("epochs", 2.5, "p.yaml: train.epochs must be an integer, got 2.5"),
    ("epochs", None, "p.yaml: train.epochs must be an integer, got None"),
    ("epochs", 0, "p.yaml: train.epochs must be >= 1, got 0"),
    ("lr", "fast", "p.yaml: train.lr must be a number, got 'fast'"),
    ("lr", 11, "p.yaml: train.lr must be <= 10.0, got 11"),
    ("use_gpu", 1, "p.yaml: train.use_gpu must be a boolean, got 1"),
    ("use_gpu", "yes", "p.yaml: train.use_gpu must be a boolean, got 'yes'"),
    ("header", 0, "p.yaml: train.header must be a boolean or null, got 0"),
    ("budget_s", -1, "p.yaml: train.budget_s must be >= 0, got -1"),
    ("loss", "mse", "p.yaml: train.loss must be one of bce, softmax, gbce; got 'mse'"),
    ("holdout", "none", "p.yaml: train.holdout must be one of valid, test; got 'none'"),
    ("ks", [1, 0], "p.yaml: train.ks must be >= 1, got [1, 0]"),
    ("ks", [], "p.yaml: train.ks must be a list of integers, got []"),
    ("ks", ["a"], "p.yaml: train.ks must be a list of integers, got ['a']"),
    ("user_col", [1], "p.yaml: train.user_col must be a string or null, got [1]"),
])
def test_check_values_errors(key, value, message):
    with pytest.raises(EzSASRecError) as err:
        check({key: value})
    assert str(err.value) == message


def test_check_values_needs_a_mapping():
    with pytest.raises(EzSASRecError, match="p.yaml: train: expected a mapping"):
        check([1])


# --------------------------------------------------------------------------------------------
# Constructed configs


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
    ({"epochs": True}, "--epochs must be an integer, got True"),
    ({"lr": None}, "--lr must be a number, got None"),
    ({"loss": "mse"}, "--loss must be one of bce, softmax, gbce; got 'mse'"),
    ({"ks": (0,)}, "--k must be >= 1, got (0,)"),
    ({"header": "no"}, "--header must be a boolean or None, got 'no'"),
])
def test_check_instance_names_the_flag(kwargs, message):
    with pytest.raises(EzSASRecError) as err:
        Toy(data="d", **kwargs)
    assert str(err.value) == message


def test_check_instance_prefix_and_normalization():
    config = Toy(data="d", user_col=2, lr=1, callback=print)
    assert config.user_col == "2" and config.lr == 1 and config.callback is print

    @dataclass(frozen=True)
    class Serve:
        max_k: int = option(100, "largest k", min=1)
        model_version: str | None = option(None, "a version")

        def __post_init__(self):
            check_instance(self, prefix="serve.")

    with pytest.raises(EzSASRecError, match=r"^serve.max_k must be >= 1, got 0$"):
        Serve(max_k=0)
    assert Serve(model_version=3).model_version == "3"  # frozen: set back all the same


# --------------------------------------------------------------------------------------------
# Documentation


def test_yaml_example_loads_to_the_defaults():
    yaml = pytest.importorskip("yaml")
    text = yaml_example(Toy, indent=0)
    assert "# passes over the data\nepochs: 20\n" in text
    assert "data:  # required" in text and "output" not in text
    loaded = yaml.safe_load(text)
    expected = {k: v for k, v in defaults(Toy).items() if k in yaml_keys(Toy)}
    expected["ks"] = list(expected["ks"])
    assert loaded == {"data": None, **expected}
    assert check_values(Toy, {k: v for k, v in loaded.items() if k != "data"}, source="x")


def test_markdown_table():
    table = markdown_table(Toy)
    assert "| `--epochs` | `20` | passes over the data |" in table
    assert "| `--data` | required |" in table and "--k`" in table
    assert "callback" not in table


def test_yaml_example_quotes_only_where_needed():
    yaml = pytest.importorskip("yaml")

    @dataclass
    class Words:
        split: str = option("loo", "split")
        word: str = option("yes", "a YAML word")
        sep: str = option(",", "delimiter")
        tiny: float = option(1e-05, "small")

    text = yaml_example(Words, indent=0)
    assert "split: loo\n" in text and 'word: "yes"\n' in text
    assert yaml.safe_load(text) == defaults(Words)
