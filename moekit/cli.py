"""The `moekit` command line: one subcommand per job, each parsed into its room's options dataclass and handed to
that room. Errors users can cause (MoekitError, file-system errors, Ctrl-C, SIGTERM) end in one line and a
non-zero exit; `--debug` shows the traceback. Building the parser imports no torch: the rooms are imported when
their command runs."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from moekit.llama.errors import ConfigError, MoekitError, one_line
from moekit.llama.io import package_version
from moekit.llama.options import option
from moekit.moe.accounting.cost import Plan
from moekit.moe.bench.options import GemmBenchOptions, LayerBenchOptions, TrainBenchOptions
from moekit.moe.eval.options import EvalOptions
from moekit.moe.train.options import GenerateOptions, PlotOptions, TokenizerOptions, TrainOptions
from moekit.upcycle.options import UpcycleOptions, VerifyOptions

from .args import Parser, add_options, given_options, options_from, print_error


@dataclass
class Progress:
    progress: bool = option(True, "no progress bar")


@dataclass
class ParamsOutput:
    json: bool = option(False, "print JSON (total_params, active_params, components, ...)")
    explain: bool = option(False, "show each derived figure's formula and inputs")


@dataclass
class PlannedUpcycle:
    num_experts: int | None = option(None, "cost an upcycle of the dense TARGET before making it: E experts per "
                                     "MoE layer (as `moekit upcycle --num-experts`)", metavar="E", min=1)
    top_k: int = option(2, "with --num-experts: experts per token", metavar="K", min=1)
    moe_layers: str = option("all", "with --num-experts: all | every-other | a list like 0,2,5", metavar="LAYERS")
    shared_experts: int = option(0, "with --num-experts: dense shards fused into a shared expert", metavar="S",
                                 min=0)


@dataclass
class VerifyOutput(Progress):
    json: bool = option(False, "print the result as JSON")


@dataclass
class EvalOutput:
    json: bool = option(False, "print the results as JSON (rows: model, data, tokens, bytes, loss, bits_per_byte and "
                        "their _low / _high bounds, ...)")


# ---- what each command does with its options (the rooms are imported here, when a command runs) ------------

def _upcycle_options(args) -> UpcycleOptions:
    """The flags, or with --config the recipe file with the flags given beside it on top."""
    if not args.config:
        return options_from(UpcycleOptions, args)
    from moekit.upcycle.recipe_file import read_recipe

    given = given_options(UpcycleOptions, args.argv) - {"config"}
    return read_recipe(args.config, {name: getattr(args, name) for name in given})


def _upcycle(args, options: UpcycleOptions) -> int:
    from moekit.llama.errors import ConfigError
    from moekit.upcycle.convert import upcycle
    from moekit.upcycle.donors import merge_donors

    src, dst = (args.src, args.dst) if args.dst is not None else (None, args.src)  # one path: DST
    if dst is None:
        raise ConfigError("DST is missing: moekit upcycle SRC DST, or DST --donors A B C (DST before --donors, "
                          "whose list would take it), or --config FILE DST")
    if src is None and not options.donors:
        raise ConfigError(f"SRC is missing: moekit upcycle SRC {dst}, or {dst} --donors A B C, or --config FILE "
                          f"{dst}")
    if src is not None and options.donors:
        raise ConfigError(f"SRC {src} given with --donors: the base is --base (default: the first donor)")
    if options.donors:
        merge_donors(dst, options, progress=args.progress)
    else:
        upcycle(src, dst, options, progress=args.progress)
    return 0


def _verify(args, options: VerifyOptions) -> int:
    from moekit.llama.checkpoint import dtype_from_name
    from moekit.llama.errors import ConfigError
    from moekit.upcycle.verify import LOGIT_ATOL, verify_checkpoints, verify_merged

    if args.dense is None:
        raise ConfigError("MOE is missing: moekit verify DENSE MOE, or moekit verify MOE for an MoE merged from donors")
    if args.moe is None:  # MOE alone: an MoE merged from donors, checked against them
        result = verify_merged(args.dense, tokens=options.tokens, atol=options.atol, seed=options.seed,
                               progress=args.progress)
        args.moe, args.dense = args.dense, "its donors"
    else:
        atol = LOGIT_ATOL if options.atol is None else options.atol
        result = verify_checkpoints(args.dense, args.moe, tokens=options.tokens, atol=atol, seed=options.seed,
                                    progress=args.progress, dense_dtype=dtype_from_name(options.dense_dtype))
    print(json.dumps(result.to_dict()) if args.json else f"{args.moe} vs {args.dense}: {result.line()}")
    return 0 if result.ok else 1


def _params(args, plan: Plan) -> int:
    from moekit.moe.accounting import as_json, count_params, derive, render_table

    if not args.num_experts and (args.top_k != 2 or args.moe_layers != "all" or args.shared_experts):
        raise ConfigError("--top-k, --moe-layers and --shared-experts shape an upcycle: give --num-experts too")
    report = derive(_planned_upcycle(args) if args.num_experts else count_params(args.target), plan)
    print(json.dumps(as_json(report, args.explain), indent=2) if args.json else render_table(report, args.explain))
    return 0


def _planned_upcycle(args):
    """The count of what `moekit upcycle TARGET --num-experts E ...` would make."""
    from moekit.moe.accounting import count_params
    from moekit.upcycle.convert import planned_config

    options = UpcycleOptions(num_experts=args.num_experts, top_k=args.top_k, moe_layers=args.moe_layers,
                             shared_experts=args.shared_experts)
    config, layers = planned_config(args.target, options)
    count = count_params(config)
    count.target = f"{args.target} upcycled ({args.num_experts} experts, top-{args.top_k}, {len(layers)} MoE layers)"
    return count


def _train(args, options: TrainOptions) -> int:
    from moekit.moe.train.loop import train

    train(options, given=given_options(TrainOptions, args.argv) | ({"model"} if options.model else set()))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # one process of several, done: leave now
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the C++ teardown at interpreter exit can abort (std::terminate) while gloo's threads wind down
    return 0


def _tokenizer_train(args, options: TokenizerOptions) -> int:
    from moekit.moe.train.tokenizer import train_tokenizer

    print(train_tokenizer(options.data, options.out, options.vocab_size, options.text_field, options.force,
                          options.progress))
    return 0


def _generate(args, options: GenerateOptions) -> int:
    from moekit.moe.train.sample import completions, for_terminal

    done = completions(options.model, options.prompt, options.max_new_tokens, options.temperature, options.top_k,
                       options.seed, chat=options.use_chat(), system=options.system, top_p=options.top_p,
                       repetition_penalty=options.repetition_penalty)
    if options.json:
        print(json.dumps([{"prompt": p, "completion": c.text, **({"ended_turn_at_once": True} if c.ended_turn_at_once
                                                                  else {})} for p, c in zip(options.prompt, done)],
                         indent=1))
    else:
        for p, c in zip(options.prompt, done):
            ended = "\n(the model ended its turn at once)" if c.ended_turn_at_once else ""
            print(f"{for_terminal(p)}{chr(10) if c.chat else ''}{for_terminal(c.text)}{ended}\n{'-' * 40}")
    return 0


def _eval(args, options: EvalOptions) -> int:
    from moekit.moe.eval.run import evaluate, table, to_json

    result = evaluate(options)
    print(to_json(result) if args.json else table(result))
    return 0


def _plot(args, options: PlotOptions) -> int:
    from moekit.moe.train.plot import plot

    plot(options)
    return 0


def _bench_layer(args, options: LayerBenchOptions) -> int:
    from moekit.moe.bench.layer import run

    run(options)
    return 0


def _bench_gemm(args, options: GemmBenchOptions) -> int:
    from moekit.moe.bench.gemm import run

    run(options)
    return 0


def _bench_train(args, options: TrainBenchOptions) -> int:
    from moekit.moe.bench.train import run

    run(options)
    return 0


@dataclass
class Command:
    """A subcommand: its options dataclass (whose docstring gives the help line, then the description) and what
    runs it."""

    name: str
    options: type | None = None  # the room's options dataclass
    run: Callable | None = None  # run(args, options) -> exit code
    positionals: tuple[tuple, ...] = ()  # (name, metavar, help[, optional]) not held by the options
    extra: tuple[type, ...] = ()  # output flags of the command line itself
    subcommands: tuple[Command, ...] = ()
    help: str = ""  # for a command without options
    load: Callable | None = None  # load(args) -> options, instead of the flags alone (e.g. a recipe file)

    def texts(self) -> tuple[str, str]:
        """(help line, description)."""
        if self.options is None:
            return self.help, self.help
        first, _, rest = inspect.getdoc(self.options).partition("\n\n")
        return first, " ".join(rest.split()) or first


COMMANDS = (
    Command("upcycle", UpcycleOptions, _upcycle, (("src", "SRC", "dense Llama checkpoint directory (config.json + "
                                                   "safetensors); none with --donors or --config", True),
                                                  ("dst", "DST", "output directory (must not exist unless --force)",
                                                   True)),
            (Progress,), load=_upcycle_options),
    Command("verify", VerifyOptions, _verify, (("dense", "DENSE", "reference checkpoint directory (the dense source); "
                                                "none for an MoE merged from --donors", True),
                                               ("moe", "MOE", "checkpoint directory to check (the upcycled model)",
                                                True)),
            (VerifyOutput,)),
    Command("params", Plan, _params, (("target", "TARGET", "preset name, config.json, checkpoint directory, or a "
                                       "count (7B, 175e9)"),), (PlannedUpcycle, ParamsOutput)),
    Command("train", TrainOptions, _train),
    Command("generate", GenerateOptions, _generate),
    Command("eval", EvalOptions, _eval, extra=(EvalOutput,)),
    Command("plot", PlotOptions, _plot),
    Command("tokenizer", help="tokenizers for training: train one on text",
            subcommands=(Command("train", TokenizerOptions, _tokenizer_train),)),
    Command("bench", help="benchmarks that print a table and write JSON: a routed layer, the grouped-GEMM kernels, or "
            "training steps of an MoE model", subcommands=(Command("layer", LayerBenchOptions, _bench_layer),
                                                            Command("gemm", GemmBenchOptions, _bench_gemm),
                                                            Command("train", TrainBenchOptions, _bench_train))),
)


def _add(sub, command: Command) -> None:
    help, description = command.texts()
    p = sub.add_parser(command.name, help=help, description=description)
    for name, metavar, text, *optional in command.positionals:
        p.add_argument(name, metavar=metavar, help=text, **({"nargs": "?"} if optional else {}))
    for cls in (command.options, *command.extra):
        if cls is not None:
            add_options(p, cls)
    if command.subcommands:
        inner = p.add_subparsers(dest="subcommand", metavar="WHAT", required=True, parser_class=Parser)
        for c in command.subcommands:
            _add(inner, c)
    else:
        p.set_defaults(command_spec=command)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moekit", description="Upcycle dense Llama checkpoints into Mixture-of-Experts models, "
                    "train them, and account for their cost.")
    parser.add_argument("--version", action="version", version=f"moekit {package_version('moekit') or 'unknown'}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        _add(sub, command)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, systemd, Kubernetes), handled like Ctrl-C: temporary outputs are removed on the way out."""


def _terminate(signum, frame):
    """The first SIGTERM stops the command (its clean-up runs); later ones during the clean-up are ignored, so it
    is not cut short half way (SIGKILL still ends the process)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        if on_main_thread:  # after the command (the interpreter's exit included), SIGTERM ends the process quietly
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str]) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets its escape, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if argv[:3] == ["bench", "gemm", "--"]:  # the older `bench gemm -- OPTIONS` form
        del argv[2]
    name, debug = next((a for a in argv if not a.startswith("-")), ""), "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        spec = getattr(args, "command_spec", None)
        if spec is None:
            parser.print_help()
            return 0
        name = " ".join(filter(None, (args.command, getattr(args, "subcommand", None))))
        args.argv = argv
        return int(spec.run(args, spec.load(args) if spec.load else options_from(spec.options, args)) or 0)
    except MoekitError as e:
        if debug:
            raise
        print_error(name, str(e))
        return 2
    except OSError as e:  # the file system: disk full, read-only, permission denied, ...
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print_error(name, f"{where}{e.strerror or e}")
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        word = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(one_line(f"moekit{' ' + name if name else ''}: {word}{'; ' + str(e) if str(e) else ''}"),
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
