"""The ``ezsasrec`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from . import outputs
from .errors import EzSASRecError, find_user_error, quiet_ray_data_errors
from .options import OPTION_KEY, add_arguments, defaults, from_namespace
from .runtime import quiet_ray_data_progress, quiet_ray_logs


def _bool_or_none(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "y")


def _help_of(cls, name: str) -> str:
    """The one-line help a config field declares (for a flag written by hand)."""
    return next(f.metadata[OPTION_KEY].help for f in dataclasses.fields(cls) if f.name == name)


def _add_address(parser: argparse.ArgumentParser):
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")


def _add_output(parser: argparse.ArgumentParser, what: str):
    parser.add_argument("--output", required=True, help=what)


def _add_overwrite(parser: argparse.ArgumentParser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (default: False)")


def _add_inputs(parser: argparse.ArgumentParser, *, data: bool = True, model: bool = True):
    if data:
        parser.add_argument("--data", required=True, help="prepared-dataset directory")
    if model:
        parser.add_argument("--model", required=True, help="model directory")


# Each subcommand's flags: the fields of its stage's config (options.add_arguments), plus the
# flags that are not options of the stage (--output, --overwrite, --address, ...).


def _synth_flags(p: argparse.ArgumentParser):
    from .synth import SynthConfig

    add_arguments(p, SynthConfig)
    _add_output(p, "directory to write the log")
    _add_overwrite(p)
    _add_address(p)


def _prepare_flags(p: argparse.ArgumentParser):
    from .prepare import PrepareConfig

    names = [f.name for f in dataclasses.fields(PrepareConfig)]
    header = names.index("header")
    add_arguments(p, PrepareConfig, only=names[:header])
    # --header true/false (a boolean flag, --header/--no-header, would break existing calls)
    p.add_argument("--header", type=_bool_or_none, default=None, metavar="{true,false}",
                   help=_help_of(PrepareConfig, "header"))
    core = p.add_mutually_exclusive_group()
    add_arguments(core, PrepareConfig, only=("k_core",))
    add_arguments(p, PrepareConfig, only=names[header + 1:], skip=("k_core", "overwrite"))
    _add_overwrite(p)
    _add_address(p)


def _train_flags(p: argparse.ArgumentParser):
    from .train import TrainConfig

    _add_inputs(p, model=False)
    _add_output(p, "model directory to write")
    p.add_argument("--params", default=None, metavar="JSON",
                   help="training options from a file: best.json of `ezsasrec tune`, or a "
                        "mapping of options; flags given as well override it (default: None)")
    add_arguments(p, TrainConfig)
    _add_overwrite(p)
    _add_address(p)


def _tune_flags(p: argparse.ArgumentParser):
    from .train import TrainConfig
    from .tune import TuneConfig

    _add_inputs(p, model=False)
    _add_output(p, "directory to write the trials, best.json (and the refit model/)")
    add_arguments(p, TuneConfig)
    base = p.add_argument_group("training options of every trial (the search space "
                                "overrides those it searches)")
    add_arguments(base, TrainConfig, skip=("num_workers", "cpus_per_worker", "run_name",
                                           "verbose", "max_failures", "keep_checkpoints"))
    _add_overwrite(p)
    _add_address(p)


def _evaluate_flags(p: argparse.ArgumentParser):
    from .evaluate import EvaluateConfig

    _add_inputs(p)
    add_arguments(p, EvaluateConfig, skip=("exclude_seen",))
    p.add_argument("--include-seen", dest="exclude_seen", action="store_false",
                   help="do not exclude the user's history from the ranking (default: False)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (default: False)")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="do not write the result to MODEL/evaluation.json (default: False)")


def _score_flags(p: argparse.ArgumentParser):
    from .score import ScoreConfig

    _add_inputs(p)
    _add_output(p, "output directory to write")
    add_arguments(p, ScoreConfig)
    _add_overwrite(p)
    _add_address(p)


def _serve_flags(p: argparse.ArgumentParser):
    from .serve import ServeConfig

    add_arguments(p, ServeConfig, skip=("batch_wait_timeout_s", "api_key"))
    p.add_argument("--batch-wait-ms", type=float,
                   default=defaults(ServeConfig)["batch_wait_timeout_s"] * 1000.0,
                   help="how long a batch waits for more requests, in ms (default: "
                        "%(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="fixed replicas (default: 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="autoscale between MIN and MAX replicas (default: off)")
    p.add_argument("--num-cpus", type=float, default=1,
                   help="CPUs per replica (default: %(default)s)")
    p.add_argument("--num-gpus", type=float, default=0,
                   help="GPUs per replica (default: %(default)s)")
    _add_address(p)


def _export_flags(p: argparse.ArgumentParser):
    from .export import ExportConfig

    add_arguments(p, ExportConfig)
    _add_overwrite(p)


_SUBCOMMANDS = {  # name -> (help, flags)
    "synth": ("write a synthetic log with sequential structure", _synth_flags),
    "prepare": ("raw log -> k-core filtered, encoded sequences", _prepare_flags),
    "train": ("train SASRec on Ray Train", _train_flags),
    "tune": ("search training options on Ray Tune (ASHA), then refit the best",
             _tune_flags),
    "evaluate": ("full-catalog leave-one-out metrics + baselines", _evaluate_flags),
    "score": ("top-N over the full catalog for every user", _score_flags),
    "serve": ("answer recommendations online with Ray Serve", _serve_flags),
    "export": ("write a model as a TensorFlow SavedModel for other servers", _export_flags),
}


class _Subcommand(argparse.ArgumentParser):
    """A subcommand parser that adds its flags when first used, so that ``ezsasrec --help``
    and each subcommand import only the stage modules they need."""

    def __init__(self, *args, add_flags=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_flags = add_flags

    def _ready(self):
        add_flags, self._add_flags = self._add_flags, None
        if add_flags is not None:
            add_flags(self)

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, and ``namespace.explicit``: the options given on the command line
        (a flag given at its default value counts), for ``--params`` to yield to them."""
        self._ready()
        unset = object()
        probe = argparse.Namespace(**{a.dest: unset for a in self._actions
                                      if a.dest != argparse.SUPPRESS},
                                   **(vars(namespace) if namespace is not None else {}))
        namespace, rest = super().parse_known_args(args, probe)
        explicit = set()
        for action in self._actions:
            if getattr(namespace, action.dest, None) is unset:
                setattr(namespace, action.dest, action.default)
            elif action.dest != argparse.SUPPRESS:
                explicit.add(action.dest)
        namespace.explicit = explicit
        return namespace, rest

    def format_usage(self):
        self._ready()
        return super().format_usage()

    def format_help(self):
        self._ready()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ezsasrec", description="SASRec from raw logs to top-N recommendations on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)
    for name, (text, add_flags) in _SUBCOMMANDS.items():
        commands.add_parser(name, help=text, description=text, add_flags=add_flags)
    return parser


def options_reference() -> str:
    """docs/options.md: every subcommand's flags with their defaults and help, read from the
    parser (so from the config dataclasses), never typed again."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Options", "",
             "Generated from the parser (`python -m ezsasrec_ray.cli --options-reference`); "
             "each stage's options are the fields of its config dataclass, and the YAML "
             "sections of `jobs/` take the same names (underscores for dashes).", ""]
    for name, sub in commands.choices.items():
        sub.format_help()  # adds the subcommand's flags
        lines += [f"## ezsasrec {name}", "", sub.description or "", "",
                  "| flag | default | help |", "| --- | --- | --- |"]
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flags = ", ".join(f"`{f}`" for f in action.option_strings)
            default = "required" if action.required else f"`{action.default}`"
            text = (action.help or "").replace("%(default)s", str(action.default))
            text = text.removesuffix(f" (default: {action.default})").replace("|", "\\|")
            lines.append(f"| {flags} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


def _options(cls, args: argparse.Namespace, **overrides) -> dict:
    """The stage's options from the parsed flags, as keyword arguments: the config is built
    (and so checked) here, before Ray starts."""
    config = from_namespace(cls, args, **overrides)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.init}


def _save_evaluation(result: dict, model_dir: str, stream):
    """evaluate()'s result as MODEL/evaluation.json (atomically), and one line saying where;
    a directory we may not write to gets a warning, not a failed run."""
    path = os.path.join(model_dir, "evaluation.json")
    try:
        outputs.write_json_atomic(path, result)
    except OSError as exc:
        print(f"ezsasrec evaluate: warning: could not write {path} ({exc.strerror or exc}); "
              "--no-save skips it", file=sys.stderr)
        return
    print(f"evaluation written to {path}", file=stream)


def _with_params(cls, args: argparse.Namespace) -> dict:
    """The training options: ``--params`` file, then the flags given on the command line."""
    from .train_loop import read_params

    options = _options(cls, args)
    if args.params:
        params = read_params(args.params)
        options.update({k: v for k, v in params.items() if k not in args.explicit})
        cls(**options)  # the combination checked before Ray starts
    return options


def _tune(args: argparse.Namespace):
    """Search, print the best trial, then (unless --no-refit) the refit into OUTPUT/model."""
    from .train import TrainConfig, train
    from .tune import TuneConfig, print_best, refit_options, tune

    best = tune(args.data, args.output, train_options=_options(TrainConfig, args),
                address=args.address, overwrite=args.overwrite, **_options(TuneConfig, args))
    print_best(best)
    print(f"trials, best.json and trials.png written to {args.output}")
    if args.refit:
        model_dir = os.path.join(args.output, "model")
        print(f"refit: {best['best_epoch']} epochs on the validation targets too "
              "(holdout test)")
        train(args.data, model_dir, address=args.address, **refit_options(best))
        print(f"refit model written to {model_dir}")


def run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from .synth import SynthConfig, synth

        synth(args.output, overwrite=args.overwrite, address=args.address,
              **_options(SynthConfig, args))
    elif args.command == "prepare":
        from .prepare import PrepareConfig, prepare

        options = _options(PrepareConfig, args)
        prepare(options.pop("input"), options.pop("output"), address=args.address, **options)
    elif args.command == "train":
        from .train import TrainConfig, train

        metrics = train(args.data, args.output, address=args.address,
                        overwrite=args.overwrite, **_with_params(TrainConfig, args))
        if metrics["valid"]:
            print(f"model written to {args.output}: best epoch {metrics['best_epoch']}, "
                  f"validation NDCG@10 {metrics['valid']['NDCG@10']:.4f}, "
                  f"HR@10 {metrics['valid']['HR@10']:.4f}")
        else:
            print(f"model written to {args.output}: epoch {metrics['best_epoch']} "
                  f"(holdout {args.holdout}: no validation)")
    elif args.command == "tune":
        _tune(args)
    elif args.command == "evaluate":
        import json

        from .evaluate import EvaluateConfig, evaluate, format_table

        result = evaluate(args.data, args.model, **_options(EvaluateConfig, args))
        print(json.dumps(result) if args.json else format_table(result))
        if args.save and os.path.isdir(args.model):
            _save_evaluation(result, args.model, sys.stderr if args.json else sys.stdout)
    elif args.command == "score":
        from .score import ScoreConfig, recommend

        recommend(args.model, args.data, output=args.output, overwrite=args.overwrite,
                  address=args.address, **_options(ScoreConfig, args))
    elif args.command == "serve":
        from .serve import ServeConfig, run_server

        options = _options(ServeConfig, args, batch_wait_timeout_s=args.batch_wait_ms / 1000.0)
        run_server(options.pop("model"), options.pop("data"), host=args.host, port=args.port,
                   replicas=args.replicas, autoscale=args.autoscale, address=args.address,
                   num_cpus=args.num_cpus, num_gpus=args.num_gpus, **options)
    elif args.command == "export":
        from .export import ExportConfig, export

        info = export(**_options(ExportConfig, args), overwrite=args.overwrite)
        print(f"SavedModel written to {args.output}/saved_model (signatures "
              f"{', '.join(info['signatures'])}; maxlen {info['maxlen']}, dim {info['dim']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if list(argv if argv is not None else sys.argv[1:]) == ["--options-reference"]:
        print(options_reference())
        return 0
    args = build_parser().parse_args(argv)
    quiet_ray_data_errors()
    quiet_ray_logs()  # our own lines, Ray's warnings and errors; Ray's INFO lines in its logs
    quiet_ray_data_progress()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for bad input, traceback otherwise
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"ezsasrec {args.command}: error: {user_error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "EzSASRecError"]
