"""Networks in the engine, everything else in the CPU worker: the link between them, both ends.

On the CPU the scoring engine has nothing to gain from doing more than the
networks: batching saves nothing there, and every image it handled whole
cost a second process hop, Stage II's full-resolution image copied into
shared memory and read again, and the lung masks made twice
(docs/benchmarks.md, "The scoring engine on the CPU against the worker
pool"). So an engine on the CPU also listens on a Unix socket, and each CPU
worker scores its job with the pool's own :func:`~.instance.score_instance`
over a :class:`~.pipeline.Pipeline` whose two predictors are
:class:`RemotePredictor`: each network call sends the model's input (in the
job's ring slot) to the engine, which batches the calls of many jobs per
network and writes the outputs beside the input. Same code as the pool, so
the same scores; what crosses a process is each network's input and output
at model resolution.

The socket lives in a directory only this user can enter, and both ends
prove the parent's multiprocessing authentication key before any pickle is
read (:mod:`multiprocessing.connection`).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import current_process
from multiprocessing.connection import Client, Connection, Listener
from typing import TYPE_CHECKING, Any

import numpy as np

from .shm import Block, Ring, open_block, unlink, write_beside, write_block, write_slot

if TYPE_CHECKING:
    from .models import ModelSpec

log = logging.getLogger(__name__)

#: The inbox kind of whole jobs from the scoring client (``engine.submit``); network calls' kinds are the
#: networks' names, :data:`NETWORKS`.
JOBS = "jobs"
NETWORKS = ("lungs", "disease")


class EngineGone(RuntimeError):
    """The engine closed the link or answered with an error: the job fails with this text and is retried."""


@dataclass(frozen=True)
class NetworkCall:
    """One network call of one job: ``block`` holds ``x``, the network's (N, C, S, S) float32 input."""

    call: int
    network: str
    block: Block


@dataclass(frozen=True)
class NetworkAnswer:
    """``block`` holds ``probs`` (N, S, S) and, for a model with a classification head, ``p`` (N,)."""

    call: int
    block: Block | None = None
    error: str | None = None


# --------------------------------------------------------------------------- in the engine process


class Inbox:
    """Requests from every client by kind; :meth:`take` gives one kind's batch, oldest first.

    A lane blocks for the first request, then waits at most ``max_wait`` seconds for more of that kind, up
    to ``max_batch``. :meth:`close` wakes every lane: nothing more is taken.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._queues: dict[str, deque[tuple[float, Any]]] = {}
        self.closed = False

    def put(self, kind: str, item: Any) -> None:
        with self._ready:
            self._queues.setdefault(kind, deque()).append((time.monotonic(), item))
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def take(self, max_batch: int, max_wait: float) -> tuple[str, list[Any]] | None:
        with self._ready:
            while not self.closed and not any(self._queues.values()):
                self._ready.wait()
            if self.closed:
                return None
            kind = min((q[0][0], k) for k, q in self._queues.items() if q)[1]
            waiting = self._queues[kind]
            deadline = time.monotonic() + max_wait
            while len(waiting) < max_batch and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            return kind, [waiting.popleft()[1] for _ in range(min(max_batch, len(waiting)))]


def listen(address: str) -> Listener:
    return Listener(address, family="AF_UNIX", authkey=bytes(current_process().authkey))


def accept_workers(listener: Listener, inbox: Inbox) -> None:
    """Thread: each worker that connects gets a reader thread putting its calls into ``inbox``."""
    while not inbox.closed:
        try:
            link = listener.accept()
        except Exception as exc:  # a peer that failed the handshake: log and go on; a closed listener: stop
            if inbox.closed:
                return
            log.warning("engine link refused: %s", type(exc).__name__)
            continue
        threading.Thread(target=_read_calls, args=(link, threading.Lock(), inbox), name="engine-link",
                         daemon=True).start()


def _read_calls(link: Connection, sending: threading.Lock, inbox: Inbox) -> None:
    while True:
        try:
            call = link.recv()
        except (EOFError, OSError):  # the worker is gone
            link.close()
            return
        if isinstance(call, NetworkCall) and call.network in NETWORKS:
            inbox.put(call.network, (link, sending, call))


def answer_calls(run: Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray | None]], network: str,
                 batch: list[tuple[Connection, threading.Lock, NetworkCall]]) -> None:
    """Run ``network`` once on the batch's inputs, write each call's outputs beside its input, answer each."""
    answers: dict[int, NetworkAnswer] = {}
    parts: list[tuple[int, int]] = []  # (index in batch, images) of the readable inputs
    with ExitStack() as stack:
        inputs = []
        for i, (_, _, call) in enumerate(batch):
            try:
                x = stack.enter_context(open_block(call.block))["x"]
            except Exception as exc:  # this call alone fails
                answers[i] = NetworkAnswer(call.call, error=f"input not readable: {type(exc).__name__}: {exc}")
                continue
            inputs.append(x)
            parts.append((i, len(x)))
        try:
            probs, p = run(network, np.concatenate(inputs)) if inputs else (None, None)
        except Exception as exc:  # the network failed: every call of the batch says why
            log.error("engine %s batch failed: %s: %s", network, type(exc).__name__, exc)
            probs = p = None
            for i, _ in parts:
                answers[i] = NetworkAnswer(batch[i][2].call, error=f"{type(exc).__name__}: {exc}")
            parts = []
    start = 0
    for i, n in parts:  # parts is left only when the network ran: probs is there
        assert probs is not None
        out = {"probs": probs[start:start + n]}
        if p is not None:
            out["p"] = p[start:start + n]
        start += n
        call = batch[i][2]
        answers[i] = NetworkAnswer(call.call, write_beside(call.block, out))
    for i, (link, sending, _) in enumerate(batch):
        try:
            with sending:
                link.send(answers[i])
        except OSError:  # that worker is gone; its reader thread ends
            pass


# --------------------------------------------------------------------------- in a CPU worker


class EngineLink:
    """A worker's connection to the engine at ``address``, made on first use and again for a new engine; one
    call at a time (a worker runs one job at a time). ``slot``: the ring slot of the job now running."""

    def __init__(self) -> None:
        self.address: str | None = None
        self.slot: tuple[Ring, int] | None = None
        self._link: Connection | None = None
        self._calls = itertools.count()

    def use(self, address: str, slot: tuple[Ring, int] | None) -> None:
        if address != self.address:
            self.close()
            self.address = address
        self.slot = slot

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def run(self, network: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.address is None:
            raise EngineGone("no scoring engine to send the networks to")
        block = (write_slot(*self.slot, {"x": x}) if self.slot is not None else None) or write_block({"x": x})
        answer: NetworkAnswer | None = None
        try:
            try:
                if self._link is None:
                    self._link = Client(self.address, family="AF_UNIX", authkey=bytes(current_process().authkey))
                call = NetworkCall(next(self._calls), network, block)
                self._link.send(call)
                answer = self._link.recv()
            except (EOFError, OSError) as exc:
                self.close()
                raise EngineGone(f"scoring engine is gone ({type(exc).__name__}); the job is retried") from exc
            if not isinstance(answer, NetworkAnswer) or answer.call != call.call or answer.block is None:
                error = answer.error if isinstance(answer, NetworkAnswer) else "an answer out of turn"
                self.close()
                raise EngineGone(f"scoring engine: {error}")
            with open_block(answer.block) as out:
                return out["probs"].copy(), (out["p"].copy() if "p" in out else None)
        finally:
            unlink(block)
            unlink(answer.block if isinstance(answer, NetworkAnswer) else None)


class RemotePredictor:
    """A :class:`~.predictors.Predictor` whose network runs in the engine, batched with other jobs' calls."""

    def __init__(self, spec: ModelSpec, network: str, link: EngineLink) -> None:
        self.spec = spec
        self.network = network
        self.link = link

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.link.run(self.network, np.ascontiguousarray(batch, dtype=np.float32))


SOCKET_DIR_PREFIX = "cxrtriage-engine-"


def socket_dir() -> str:
    """A new directory for an engine's socket that only this user can enter (``tempfile.mkdtemp``: 0700),
    named after this process; first, those of this user's node processes that are gone (killed, say) go."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(SOCKET_DIR_PREFIX):
            continue
        pid = name[len(SOCKET_DIR_PREFIX):].partition("-")[0]
        path = os.path.join(root, name)
        try:
            if pid.isdigit() and os.stat(path).st_uid == os.getuid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
    return tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")


def remove_socket(address: str | None) -> None:
    """Remove an engine's socket and the directory :func:`socket_dir` made for it."""
    if address is not None:
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists; the twin of storage.archive's check, which the import borders keep apart
    (storage imports nothing else of the project, inference nothing of storage)."""
    try:
        os.kill(pid, 0)  # signal 0: a check that the process exists, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process under that number
        return True
    return True
