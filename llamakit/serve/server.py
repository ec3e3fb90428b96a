"""`llamakit serve`: start the HTTP server at once (`/health` says 503 while loading), load the model on a
thread, then hand it to a Scheduler; on Ctrl-C / SIGTERM drain running requests and exit."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass

import uvicorn

from llamakit.generate.compiled import CompiledDecode
from llamakit.serve.app import ServerState, create_app
from llamakit.serve.responses import TokenTexts
from llamakit.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How to serve (the model itself comes from the `load` function given to serve)."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 8
    max_waiting: int = 256
    prefill_chunk: int = 256
    seed: int | None = None
    max_body_bytes: int = 4 * 2**20
    drain_seconds: float = 5.0
    compile: bool = False  # decode with a torch.compile'd step, compiled for every batch bucket before ready


class _Server(uvicorn.Server):
    """uvicorn's server, except that Ctrl-C / SIGTERM drain and exit with status 0 (uvicorn re-raises the signal
    once it has shut down, so the process would end as killed)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("shutting down: finishing running requests (at most %s s)", self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)


def _compiled(cfg: ServeConfig, model) -> CompiledDecode | None:
    if not cfg.compile:
        return None
    log.info("compiling the decode step for every batch size up to %d (/health says loading until done)",
             cfg.max_batch_size)
    return CompiledDecode(model)


def serve(cfg: ServeConfig, load, load_guard=None) -> None:
    """Run until interrupted. `load()` returns (model, tokenizer, max_seq_len, chat_style), `load_guard()` (if
    given) the Guard that checks prompts and responses; their errors stop the server with that message."""
    state = ServerState(model_name=cfg.model_name, api_key=cfg.api_key,
                        max_body_bytes=cfg.max_body_bytes)
    server = _Server(uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=cfg.drain_seconds))
    failure: list[BaseException] = []

    def load_in_background() -> None:
        try:
            model, tokenizer, max_seq_len, style = load()
            state.guard = load_guard() if load_guard is not None else None  # before the scheduler: /health waits
            state.tokenizer, state.chat_style, state.token_texts = tokenizer, style, TokenTexts(tokenizer)
            state.metrics.slots_total.set(cfg.max_batch_size)
            state.scheduler = Scheduler(model, tokenizer, max_batch_size=cfg.max_batch_size, max_seq_len=max_seq_len,
                                        max_waiting=cfg.max_waiting, prefill_chunk=cfg.prefill_chunk,
                                        metrics=state.metrics, seed=cfg.seed, compiled=_compiled(cfg, model))
            log.info("serving %s at http://%s:%d/v1 (chat page at http://%s:%d/)", state.model_name, cfg.host,
                        cfg.port, cfg.host, cfg.port)
        except BaseException as e:  # noqa: BLE001 - reported by serve() once the server has stopped
            failure.append(e)
            server.should_exit = True

    threading.Thread(target=load_in_background, name="llamakit-load", daemon=True).start()
    try:
        server.run()
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
    if failure:
        raise failure[0]
