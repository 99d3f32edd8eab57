"""The `softprompt-jax` command: train | eval | infer | serve | export | inspect | demo.

`train`, `eval`, `infer` and `serve` take T5X-style flags: `--gin_file` (repeatable,
resolved against the packaged gin/ folder) and `--gin.NAME=VALUE`, e.g.

    softprompt-jax train --gin_file=models/t5_1_1_base.gin \\
        --gin_file=prompts/class_labels.gin --gin_file=runs/prompt_finetune.gin \\
        --gin.MODEL_DIR="'/tmp/boolq'" \\
        --gin.MIXTURE_OR_TASK_NAME="'taskless_super_glue_boolq_v102'" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 8}" \\
        --gin.CLASS_LABELS="['True', 'False']"

A user mistake (a bad file, setting or input) ends with one line naming what is wrong and
exit status 2; anything else is a bug and keeps its traceback (exit status 1). A training
run stopped by SIGINT/SIGTERM saves a checkpoint, says so and exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from softprompt_jax.errors import SoftpromptError, TrainingInterrupted

GIN_COMMANDS = {"train": "train", "eval": "evaluate", "infer": "infer", "serve": "serve"}
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
# What TensorFlow and CUDA write to the process's stderr while TensorFlow starts: absl's C++
# INFO and WARNING lines (written before absl::InitializeLog, which TF_CPP_MIN_LOG_LEVEL does
# not reach) and the errors of a machine without a GPU driver. Other lines pass.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|E\d{4} .*(failed call to cuInit|Unable to register cu\w+ factory))"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt-jax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in GIN_COMMANDS:
        sub = commands.add_parser(name, help=f"{name} from gin files and --gin.NAME=VALUE flags")
        sub.add_argument("--gin_file", action="append", default=[], help="a gin file (repeatable)")
        sub.add_argument(
            "--gin_search_path",
            action="append",
            default=[],
            help="an extra folder to resolve gin files and includes against",
        )
        multihost = sub.add_argument_group("multi-host (one process per host)")
        multihost.add_argument("--coordinator_address", help="host:port of process 0")
        multihost.add_argument("--num_processes", type=int)
        multihost.add_argument("--process_id", type=int)
        multihost.add_argument(
            "--multihost",
            action="store_true",
            help="start jax.distributed from the TPU pod's environment",
        )
    export = commands.add_parser(
        "export", help="export a run's prompt as .npy, PEFT or an official T5X checkpoint"
    )
    export.add_argument("--model_dir", required=True)
    written = export.add_mutually_exclusive_group(required=True)
    written.add_argument(
        "--output", help="a path ending in .npy, or a directory for the PEFT format"
    )
    written.add_argument(
        "--bank",
        help="a PROMPT_PER_TASK run: every task's prompt as one bank (.safetensors or a folder)",
    )
    export.add_argument("--task", help="a PROMPT_PER_TASK run: the task whose prompt to export")
    export.add_argument("--step", default="latest", help="'latest', 'best' or a step number")
    export.add_argument(
        "--t5x",
        action="store_true",
        help="write --output as a T5X model dir in the official prompt-tuning layout "
        "(checkpoint_<step>, the prompt at encoder/prompt/prompt/prompt)",
    )
    export.add_argument(
        "--frozen_checkpoint",
        help="with --t5x: also write this frozen model's weights, as the official code does",
    )
    _add_inspect(commands)
    demo = commands.add_parser("demo", help="the offline prompt-tuning demo (CPU, minutes)")
    demo.add_argument("--workdir", default="softprompt_demo")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="read prompts back as their nearest vocabulary pieces; a bank's similarity",
    )
    inspect.add_argument("--checkpoint", required=True, help="the frozen model the prompts are for")
    prompts = inspect.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="a prompt file (.npy, PEFT dir, ...)")
    prompts.add_argument("--prompts", help="a prompt bank: a .safetensors file or a folder of .npy")
    inspect.add_argument("--vocabulary", help="a SentencePiece model (default: the task's)")
    inspect.add_argument("--task", help="a seqio task: its vocabulary and label words")
    inspect.add_argument(
        "--labels",
        type=lambda text: [label for label in text.split(",") if label],
        help="label words to mark, comma-separated (default: the task's)",
    )
    inspect.add_argument("--k", type=int, default=5, help="nearest pieces per position")
    inspect.add_argument("--json", help="also write the report to this JSON file")


def _split_gin_bindings(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--gin.NAME=VALUE` flags out of argv (argparse cannot express them)."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            binding = arg.removeprefix("--gin.")
            if "=" not in binding:
                raise SoftpromptError(f"gin flag {arg!r} must look like --gin.NAME=VALUE")
            bindings.append(binding)
        else:
            rest.append(arg)
    return rest, bindings


def _run(args: argparse.Namespace, bindings: list[str]) -> int:
    if args.command == "demo":
        from softprompt_jax.demo import run_demo

        run_demo(args.workdir, seed=args.seed)
        return 0
    if args.command == "export":
        from softprompt_jax.commands import export_prompt

        export_prompt(
            args.model_dir,
            args.output,
            args.step,
            t5x=args.t5x,
            frozen=args.frozen_checkpoint,
            task=args.task,
            bank=args.bank,
        )
        return 0
    if args.command == "inspect":
        from softprompt_jax.commands import inspect_prompts

        inspect_prompts(
            checkpoint_path=args.checkpoint,
            prompt_file=args.prompt,
            bank_path=args.prompts,
            vocabulary_path=args.vocabulary,
            task=args.task,
            labels=args.labels,
            k=args.k,
            json_file=args.json,
        )
        return 0
    from softprompt_jax import gin_config
    from softprompt_jax.partitioning import initialize_distributed

    initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id, auto=args.multihost
    )
    if not args.gin_file:
        raise SoftpromptError(f"{args.command} needs at least one --gin_file")
    entry = GIN_COMMANDS[args.command]
    gin_config.parse(args.gin_file, bindings, args.gin_search_path, entry=entry)
    getattr(gin_config, entry)()
    return 0


def _quiet_tensorflow() -> None:
    """TensorFlow only feeds data here: keep it off the GPU and its start-up lines off the console.

    Runs before anything imports TensorFlow: its log level is read once, at import.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_without(_STARTUP_NOISE):
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


@contextlib.contextmanager
def _native_stderr_without(noise: re.Pattern) -> Iterator[None]:
    """Hold what reaches file descriptor 2 meanwhile (C++ libraries write there, not to
    `sys.stderr`), then pass on every line but those matching `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not noise.search(line)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        rest, bindings = _split_gin_bindings(argv)
    except SoftpromptError as error:
        parser.error(str(error))
    args = parser.parse_args(rest)
    if bindings and args.command not in GIN_COMMANDS:
        parser.error(f"{args.command} takes no --gin. flags")
    _quiet_tensorflow()
    try:
        return _run(args, bindings)
    except SoftpromptError as error:  # a user mistake; anything else is a bug: traceback
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"softprompt-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingInterrupted:  # the trainer saved a checkpoint and said so in one line
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
