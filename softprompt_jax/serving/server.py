"""`softprompt-jax serve`: load the frozen model and the prompts, compile every program,
then answer HTTP requests until SIGTERM or SIGINT.

On the signal the server stops accepting connections, answers the requests it has (their
batches still run), and returns 0. `ServerThread` runs the same server on a thread of the
calling process, for tests and scripts.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import seqio
from aiohttp import web

from softprompt_jax.checkpoints.pretrained import load_pretrained
from softprompt_jax.checkpoints.prompt_files import load_prompt
from softprompt_jax.checkpoints.reader import open_pretrained
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.decoder_config import is_decoder_only
from softprompt_jax.model.run_time import with_overrides
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.serving.app import Service, make_app
from softprompt_jax.serving.batcher import Batcher
from softprompt_jax.serving.config import DEFAULT_MAX_PROMPT_LENGTH, PromptsSetting, ServeConfig
from softprompt_jax.serving.engine import Engine
from softprompt_jax.serving.metrics import CompileCounter, ServeMetrics
from softprompt_jax.serving.registry import PromptRegistry
from softprompt_jax.serving.requests import Parser
from softprompt_jax.tasks.vocab import get_vocabulary
from softprompt_jax.train.run_prompts import read_run_bank
from softprompt_jax.train.state_checkpoints import NUMPY_DIR


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve `config`'s prompts on `host:port` until SIGTERM/SIGINT; 0 once stopped cleanly."""
    config.shapes()  # the settings, then the port, are checked before the slow start-up
    sock = bind(host, port)
    try:
        service = build_service(config)
    except BaseException:
        sock.close()
        raise

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for each in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(each, stop.set)
        ready = lambda bound: print(
            f"serving {len(service.registry.lengths())} prompts on http://{host}:{bound} "
            f"({service.programs} programs compiled); SIGTERM or Ctrl-C stops",
            flush=True,
        )
        await run_server(service, sock, stop, ready)

    asyncio.run(main())
    print("stopped: every request received was answered", flush=True)
    return 0


def build_service(config: ServeConfig) -> Service:
    """Everything a server needs, checked, loaded and compiled (the slow part of start-up)."""
    shapes = config.shapes()
    features = _features(config.vocabulary_path, config.task)
    bank = _initial_prompts(config.prompts)
    max_length = config.max_prompt_length or (
        max(bank.lengths) if bank is not None else DEFAULT_MAX_PROMPT_LENGTH
    )
    cfg = _t5_config(config.checkpoint_path, config.dtype, config.model_overrides)
    cfg, params = load_pretrained(config.checkpoint_path, dtype=config.dtype, config=cfg)
    registry = PromptRegistry.of(bank, config.max_prompts, max_length, cfg.emb_dim)
    engine = Engine(
        cfg, params, features["targets"].vocabulary, shapes, alpha=config.alpha, seed=config.seed
    )
    compiles = CompileCounter()
    started = time.perf_counter()
    programs = engine.warm_up(registry.snapshot().bank)
    print(
        f"compiled {programs} programs in {time.perf_counter() - started:.1f} s (batch sizes "
        f"{list(shapes.batch_sizes)} x input lengths {list(shapes.input_lengths)} x "
        f"{len(shapes.decode_modes)} decode mode(s) + scoring)",
        flush=True,
    )
    batcher = Batcher(
        lambda mode, works: engine.run(mode, works, registry.snapshot()),
        max_batch=shapes.max_batch,
        max_wait=config.max_wait_ms / 1000,
        mix_prompts=config.mix_prompts,
        max_queued=config.max_queued_rows,
    )
    metrics = ServeMetrics(
        shapes.batch_sizes,
        compiles,
        programs,
        lambda: len(registry.lengths()),
        batcher.queued_rows,
    )
    batcher.on_batch = metrics.observe_batch
    parser = Parser(features["inputs"], features["targets"], shapes, config.max_rows)
    return Service(
        registry,
        batcher,
        parser,
        metrics,
        programs,
        config.max_request_bytes,
        config.prompt_dir,
    )


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` (0: a free port), not yet listening: connections are
    refused until `run_server` accepts them."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise SoftpromptError(
            f"cannot serve on {host}:{port} (SERVE_HOST, SERVE_PORT): {error.strerror or error}"
        ) from error
    return sock


async def run_server(
    service: Service,
    sock: socket.socket,
    stop: asyncio.Event,
    ready: Callable[[int], None],
) -> None:
    """Serve on the bound `sock` until `stop` is set, then stop accepting, answer what is in
    flight and return. `ready` gets the port."""
    service.batcher.start()
    runner = web.AppRunner(make_app(service), access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    ready(sock.getsockname()[1])
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # closes the socket, then waits for the handlers in flight
        await service.batcher.close()


class ServerThread:
    """`run_server` on a thread of this process; `port` once started, `stop()` to end it."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self.service = service

        sock = bind(host, port)

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await run_server(service, sock, self._stop, self._ready)

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=60):
            raise RuntimeError("the server thread did not start")

    def _ready(self, port: int) -> None:
        self.port = port
        self._started.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop accepting, answer the requests in flight, and end the thread."""
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)


def _t5_config(path: str, dtype: str, overrides: Mapping[str, Any] | None) -> T5Config:
    """The checkpoint's config with MODEL_OVERRIDES, read before its weights load; a decoder-only
    checkpoint (GPT-2, Llama) is refused: the server's programs are T5's (encoder inputs, soft
    prompts in the bank)."""
    cfg = open_pretrained(path).config(dtype)
    if is_decoder_only(cfg):
        raise SoftpromptError(
            f"INITIAL_CHECKPOINT_PATH {path}: a decoder-only model ({type(cfg).__name__}); "
            "serve takes a T5 checkpoint"
        )
    return with_overrides(cfg, overrides)


def _features(vocabulary_path: str | None, task: str | None) -> Mapping[str, seqio.Feature]:
    """Inputs and targets features: the SentencePiece model at `vocabulary_path` (EOS added,
    as `infer` tokenizes a file's inputs), else the task's."""
    if vocabulary_path is not None:
        vocabulary = get_vocabulary(vocabulary_path)
        try:
            vocabulary.encode("")
        except Exception as error:  # TensorFlow's file errors, protobuf's parse errors
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SoftpromptError(
                f"VOCABULARY_PATH {vocabulary_path}: not a readable SentencePiece model ({first})"
            ) from error
        return {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
    if task is None:
        raise SoftpromptError(
            "set VOCABULARY_PATH (a SentencePiece model) or MIXTURE_OR_TASK_NAME (a task whose "
            "vocabulary to use) to tokenize requests"
        )
    try:
        return seqio.get_mixture_or_task(task).output_features
    except ValueError as error:
        raise SoftpromptError(f"MIXTURE_OR_TASK_NAME: no seqio task or mixture {task!r}") from error


def _initial_prompts(prompts: PromptsSetting | None) -> PromptBank | None:
    """The prompts to start with: a bank file or folder of .npy, {name: prompt file}, the
    latest prompts of a PROMPT_PER_TASK run's dir, or none."""
    if prompts is None:
        return None
    if isinstance(prompts, Mapping):
        arrays = {name: load_prompt(path) for name, path in prompts.items()}
        for name, array in arrays.items():
            if isinstance(array, Mapping):
                raise SoftpromptError(
                    f"PROMPTS[{name!r}] {prompts[name]}: a prefix (key/value per layer); serve "
                    "takes soft prompts [length, emb_dim]"
                )
        return PromptBank.from_arrays(arrays)
    if not isinstance(prompts, str):
        raise SoftpromptError(
            "PROMPTS must be a bank file or folder, a dict of prompt name -> prompt file, or a "
            f"PROMPT_PER_TASK run's dir; got {prompts!r}"
        )
    if not Path(prompts).exists():
        raise SoftpromptError(f"PROMPTS {prompts}: no such file or folder")
    if (Path(prompts) / NUMPY_DIR).is_dir():
        return read_run_bank(prompts)[1]
    return PromptBank.load(prompts)
