"""The one training loop every task shares: prefetch, step, log, evaluate, checkpoint.

The host never waits on the device except at log, eval and checkpoint steps: batches are built
ahead in a thread, and metrics stay on the device until a log step fetches them. SIGTERM (what
SLURM and cloud preemption send) ends the run after the current step with a checkpoint there.
"""

import queue
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from lm import checkpoint
from lm import metrics as metrics_lib
from lm.errors import Diverged, Preempted


class Prefetcher:
    """Builds `batch_fn(step)` for steps start..stop-1 in a background thread, `depth` ahead."""

    def __init__(self, batch_fn: Callable[[int], dict], start: int, stop: int, depth: int = 2):
        self._queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(batch_fn, start, stop), daemon=True)
        self._thread.start()

    def _fill(self, batch_fn, start, stop):
        for step in range(start, stop):
            try:
                self._queue.put((step, batch_fn(step), None))
            except Exception as e:  # handed to the consumer, which re-raises it with its traceback
                self._queue.put((step, None, e))
                return

    def get(self, step: int) -> dict:
        """The batch for `step` (steps must be asked for in order)."""
        got, batch, error = self._queue.get()
        if error is not None:
            raise error
        assert got == step, (got, step)
        return batch


class PreemptionFlag:
    """While entered, SIGTERM sets a flag instead of killing the process; `stop_at(step)` says
    whether training should stop after `step`.

    With one process that is a look at a Python bool, every step. With several, all must stop at
    the same step (each saves its shards of one checkpoint), so the flags are OR-ed across
    processes with one small allgather every `sync_every` steps (the log steps, where the host
    waits on the device anyway): a preemption is then noticed within `sync_every` steps, which
    must fit the launcher's grace period (SLURM's KillWait, 30 s by default).
    """

    def __init__(self, sync_every: int):
        self.requested = False
        self._sync_every = sync_every
        self._installed = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows no handler elsewhere
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info):
        if self._installed:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _handle(self, signum, frame):
        self.requested = True

    def stop_at(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self._sync_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _skipped(state) -> int | None:
    """The state's count of dropped non-finite steps (a host sync), or None for states without one."""
    count = getattr(state, "skipped_steps", None)
    return None if count is None else int(jax.device_get(count))


class NonFiniteGuard:
    """Applies config.train.on_nonfinite to the step's `skipped_steps` count, read where the host
    reads the device anyway (log and checkpoint steps): 'stop' raises Diverged before anything is
    saved from past the bad step; 'skip' lets the run go on and reports the count at the end."""

    def __init__(self, policy: str, start_count: int | None):
        self.policy, self.start = policy, start_count
        self.last_saved = None

    def check(self, step: int, count) -> None:
        if self.start is None or count is None or count <= self.start or self.policy != "stop":
            return
        kept = (
            f"the checkpoint of step {self.last_saved} is kept"
            if self.last_saved
            else "no checkpoint was written"
        )
        raise Diverged(
            f"non-finite loss or gradient norm at or before step {step} ({int(count - self.start)} "
            f"step(s); their updates were not applied); {kept}; "
            f"config.train.on_nonfinite='skip' drops such steps and goes on"
        )

    def summary(self, count) -> str | None:
        if self.start is None or count is None or count <= self.start:
            return None
        return f"skipped {int(count - self.start)} step(s) with a non-finite loss or gradient norm"


def train_loop(
    state,
    *,
    step_fn,
    batch_fn,
    eval_fn,
    train_cfg,
    ckpt_mngr,
    meta: dict,
    writer: metrics_lib.MetricsWriter,
    tokens_per_step: int,
    flops_per_step: float,
    peak_flops: float,
    after_eval: Callable | None = None,
    step_tokens: Callable[[int], int] | None = None,
):
    """Runs steps `state.step .. train_cfg.steps`, returns the final state.

    Args:
      step_fn: the compiled `(state, batch) -> (state, metrics)`.
      batch_fn: `step -> batch` of global sharded arrays (a pure function of the step).
      eval_fn: `params -> dict` of eval metrics (`eval_loss`, ...), or None.
      tokens_per_step, flops_per_step: for tokens/s and MFU (model FLOPs, PaLM convention).
      peak_flops: the FLOP/s of all devices together, for MFU.
      step_tokens: `step -> tokens` where batches differ in width (trimmed to their longest
        sequence): tokens_seen, tokens/s and MFU then count each step's own tokens, its FLOPs
        scaled from flops_per_step by step_tokens(step) / tokens_per_step.
      after_eval: `(step, state, record) -> None`, called after each eval (e.g. keep the best).
    Raises:
      Preempted: on SIGTERM, after saving a checkpoint at the step reached (see PreemptionFlag).
      Diverged: a non-finite step under train_cfg.on_nonfinite == 'stop' (see NonFiniteGuard).
    """
    guard = NonFiniteGuard(train_cfg.on_nonfinite, _skipped(state))
    start, total = int(state.step), int(train_cfg.steps)
    guard.last_saved = start or None  # a resumed run starts from its checkpoint
    # The bar closes on any exit, so an error line never shares its line.
    with PreemptionFlag(train_cfg.log_every) as preemption, metrics_lib.progress_bar(start, total) as bar:
        batches = Prefetcher(batch_fn, start, total)
        tokens_at = step_tokens or (lambda step: tokens_per_step)
        seen = start * tokens_per_step if step_tokens is None else sum(map(step_tokens, range(start)))
        clock, interval_tokens = time.perf_counter(), 0
        for step in range(start, total):
            state, step_metrics = step_fn(state, batches.get(step))
            done = step + 1
            tokens = tokens_at(step)
            seen, interval_tokens = seen + tokens, interval_tokens + tokens
            last = done == total
            record = {}
            if done == 1 or done % train_cfg.log_every == 0 or last:  # step 1 shows the initial loss
                record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                seconds = time.perf_counter() - clock
                record["tokens_seen"] = seen
                record["tokens_per_sec"] = interval_tokens / seconds
                record["mfu"] = flops_per_step / tokens_per_step * interval_tokens / seconds / peak_flops
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False
                )
            paused = False
            if eval_fn is not None and ((train_cfg.eval_every and done % train_cfg.eval_every == 0) or last):
                record.update(eval_fn(state.params))
                if after_eval is not None:
                    after_eval(done, state, record)
                paused = True
            if record:
                writer.write(done, record)
                guard.check(done, record.get("skipped_steps"))
            saved = done % train_cfg.checkpoint_every == 0 or last
            if saved:
                if "skipped_steps" not in record:  # a log step has just checked the same count
                    guard.check(done, _skipped(state))
                checkpoint.save(ckpt_mngr, done, state, meta)
                guard.last_saved = done
                paused = True
            if record or paused:  # throughput counts only time spent stepping
                clock, interval_tokens = time.perf_counter(), 0
            bar.update(1)
            if not last and preemption.stop_at(done):
                if not saved:
                    guard.check(done, _skipped(state))
                    checkpoint.save(ckpt_mngr, done, state, meta)
                raise Preempted(done)
    note = guard.summary(_skipped(state))
    if note and jax.process_index() == 0:
        print(note)
    return state
