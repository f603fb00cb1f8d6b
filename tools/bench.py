"""Benchmarks measured in one process, after warm-up, as the median of several repeats.

python -m tools.bench matmul [--dtype bfloat16] [--matmul_n 2048] [--json OUT]
python -m tools.bench train [--config FILE[:arg]] [--config.KEY=VALUE ...] [--torch eager,compile|none]
    [--json OUT]
python -m tools.bench train --sweep_memory [--config FILE[:arg]] [--config.KEY=VALUE ...] [--json OUT]
python -m tools.bench decode [--config FILE[:arg]] [--new_tokens 256] [--json OUT]
python -m tools.bench fit [--csv ../shared/data/chinchilla_epoch_svg_extracted_data.csv] [--json OUT]
python -m tools.bench nf4 [--config FILE[:arg]] [--json OUT]

Without --config the model is the PyTorch reference of the project's performance notes: GPT-2 style,
6 layers, 6 heads, width 384, vocab 4096, context 256, batch 8, float32, AdamW, no bias.
`--config.KEY=VALUE` overrides one key of the config (the value takes the type of the key's default).

`train` times the real jitted train step (random tokens, so no data preparation) and reports
tokens/s, model FLOP/s (PaLM convention, lm/flops.py), MFU against the matmul peak measured in the
same process, the step's temporary buffers (XLA's buffer assignment) and peak memory (the device's
counter, else the process's peak RSS, taken before the baseline runs; each figure's note says
which). In the same process it times the same model, batch and optimizer in plain PyTorch
(tools/torch_baseline.py), eager and torch.compile, in rounds interleaved with ours, and reports
our tokens/s over theirs; a baseline that cannot run is reported with its reason. `--sweep_memory`
runs the train bench for remat none/dots/full (grad_accum 1) and
grad_accum 2 and 4 (remat none), each in a fresh subprocess since a process's peak RSS only grows.

`decode` generates `--new_tokens` greedy tokens for a batch of prompts (the config's batch size,
lengths 9-16, one 16-token bucket) with the KV cache (`lm.sampling.generate`) and by full
recomputation over the fixed padded buffer (`generate_recompute`), and counts XLA compilations:
each is compiled once in its warm-up call and never again in the timed calls.

`nf4` measures what QLoRA's frozen base takes: bytes per parameter of the model's dense kernels
stored in NF4 (single and double-quantised scales) against float32, by `nbytes` of what is stored.

`fit` times the Chinchilla Approach 3 fit (Epoch AI's procedure, 4,500 L-BFGS starts) vectorised in
JAX against the plain loop of scipy L-BFGS-B over the same starts and data, in the same process,
and beside them the variable-projection fit of the same objective (`--solver varpro`).
"""

import argparse
import contextlib
import csv
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from experiments import overrides
from lm import flops, lora, quant, sampling, sharding
from lm.errors import UserError
from lm.losses import lm_loss
from lm.model import ModelConfig, build_model
from lm.optim import learning_rate_schedule, make_optimizer
from lm.scaling import chinchilla, varpro
from lm.train_state import init_state, jit_train_step
from lm.trainer import model_config


class Figure(NamedTuple):
    """A measured value with a note on how it was measured, or None and the reason it is missing."""

    value: float | None
    note: str = ""


def load_config(spec: str | None, items: list[str] = ()):
    """`path.py[:arg]` -> ConfigDict (None: the performance-notes reference model), then each
    `config.KEY=VALUE` override applied in order."""
    if spec is None:
        c = common.pretrain_config()
        c.model.update(num_layers=6, num_heads=6, d_model=384, d_ff=1536, max_seq_len=256, use_bias=False)
        c.tokenizer.vocab_size = 4096
        c.train.update(global_batch_size=8, seq_len=256)
    else:
        c = overrides.load_config(spec)
    for item in items:
        overrides.set_key(c, *overrides.parse(item, c), source="tools.bench")
    return c


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of `fn()` (which must block until done) for each repeat."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_matmul(dtype: str = "float32", n: int = 2048, repeats: int = 7) -> dict:
    """Peak matmul FLOP/s of one device in `dtype`."""
    peak = flops.measure_matmul_flops(dtype, n=n, repeats=repeats)
    return {"peak_flops": peak}


def random_tokens(vocab: int, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """[batch, seq_len + 1] int32 uniform token ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)


def lm_batch(tokens: np.ndarray) -> dict:
    """[batch, seq + 1] tokens -> the train step's dict of [batch, seq] arrays, one document a row."""
    batch, seq_len = tokens.shape[0], tokens.shape[1] - 1
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }


def compile_train_step(config, model_cfg: ModelConfig, tokens: np.ndarray, steps: int) -> tuple:
    """The jitted train step of `config` (mesh, optimizer, grad_accum) on `tokens` [batch, seq + 1].

    Returns:
      (run_steps, info): run_steps() runs `steps` steps and blocks until done; info is
      {"compile_seconds", "step_temp_bytes": XLA's temporary buffers of the compiled step
      (activations, gradients, workspace), a Figure}.
    """
    model = build_model(model_cfg)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = lambda r: model.init(r, jnp.zeros((1, tokens.shape[1] - 1), jnp.int32))["params"]
        state, shardings = init_state(init, tx, 0, mesh, rules)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        batch = sharding.global_batch(lm_batch(tokens), batch_sharding)
        loss_fn = functools.partial(lm_loss, model=model, z_loss=config.train.z_loss)
        step = jit_train_step(loss_fn, tx, schedule, config.train.grad_accum, shardings, batch_sharding, mesh)
        t = time.perf_counter()
        step = step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - t
    memory = step.memory_analysis()
    temp = (
        Figure(memory.temp_size_in_bytes, "XLA buffer assignment of the compiled step")
        if memory
        else Figure(None, "the backend gives no memory analysis")
    )
    holder = [state]

    def run_steps():
        for _ in range(steps):
            holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics)

    return run_steps, {"compile_seconds": compile_seconds, "step_temp_bytes": temp}


def torch_runners(model_cfg: ModelConfig, opt_cfg, tokens: np.ndarray, modes: tuple, steps: int) -> tuple:
    """The PyTorch baseline's train steps per mode, each run once (warm-up; torch.compile compiles).

    Returns:
      ({mode: run_steps}, {mode: why it cannot run}), e.g. torch missing, a config the baseline
      does not cover, or torch.compile without a working C++ toolchain.
    """
    if importlib.util.find_spec("torch") is None:
        return {}, {mode: "torch is not installed: pip install -e '.[bench]'" for mode in modes}
    from tools import torch_baseline

    runners, failures = {}, {}
    for mode in modes:
        try:
            run = torch_baseline.train_steps(model_cfg, opt_cfg, tokens, mode, steps)
            run()
            runners[mode] = run
        except Exception as e:  # reported as the figure's reason instead of crashing the bench
            failures[mode] = (
                f"torch {mode} failed: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            )
    return runners, failures


def interleaved_seconds(runners: dict, repeats: int) -> dict:
    """Median wall seconds of each runner over `repeats` rounds; each round runs every runner once
    in turn, so that load from other processes drifting over time falls on all of them alike."""
    seconds = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            seconds[name] += timed(run, 1)
    return {name: statistics.median(s) for name, s in seconds.items()}


def bench_train(
    config,
    steps_per_repeat: int = 5,
    repeats: int = 5,
    torch_modes: tuple = ("eager", "compile"),
    matmul_n: int = 2048,
    nominal_peak: float = 0.0,
) -> dict:
    """Train-step tokens/s, model FLOP/s, MFU and memory for `config`'s model, batch and mesh, and
    the PyTorch baseline in `torch_modes` on the same tokens, timed in interleaved rounds.

    After one warm-up call each, every round times `steps_per_repeat` steps of ours and of each
    baseline mode; figures are medians over `repeats` rounds. MFU divides by the matmul roof
    measured here in the model's dtype (`matmul_n`-sized, times the device count), the baseline's
    too (same FLOPs/token); `mfu_nominal` by `nominal_peak` FLOP/s per device (0: the data sheet's
    dense bfloat16 peak of a known device kind, for bfloat16 models), when there is one.
    """
    vocab = config.model.vocab_size or config.tokenizer.vocab_size
    model_cfg = model_config(config, vocab)
    batch_size, seq_len = config.train.global_batch_size, config.train.seq_len
    tokens = random_tokens(vocab, batch_size, seq_len)
    peak = flops.measure_matmul_flops(model_cfg.dtype, n=matmul_n) * jax.device_count()
    run_ours, info = compile_train_step(config, model_cfg, tokens, steps_per_repeat)
    run_ours()  # warm-up: every buffer of the step is allocated now
    memory = peak_memory()  # before the baseline allocates anything in this process
    runners, failures = torch_runners(model_cfg, config.optimizer, tokens, torch_modes, steps_per_repeat)
    seconds = interleaved_seconds({"ours": run_ours, **runners}, repeats)
    tokens_per_sec = {name: batch_size * seq_len * steps_per_repeat / s for name, s in seconds.items()}
    per_token = flops.flops_per_token(model_cfg, seq_len)
    ours = tokens_per_sec.pop("ours")
    out = {
        "tokens_per_sec": ours,
        "model_flops_per_sec": per_token * ours,
        "peak_flops": peak,
        "mfu": per_token * ours / peak,
        "step_seconds": seconds["ours"] / steps_per_repeat,
        **info,
        "params": flops.param_counts(model_cfg)["total"],
        **memory,
    }
    kind = jax.devices()[0].device_kind
    nominal = nominal_peak or (flops.PEAK_BF16.get(kind, 0.0) if model_cfg.dtype == "bfloat16" else 0.0)
    if nominal:
        out["nominal_peak_flops"] = nominal * jax.device_count()
        out["mfu_nominal"] = per_token * ours / out["nominal_peak_flops"]
    note = ""
    if runners:
        from tools import torch_baseline

        note = torch_baseline.describe()
        out["torch_peak_flops"] = Figure(
            torch_baseline.matmul_flops(matmul_n), f"float32 {matmul_n}^3 matmul, {note}"
        )
    for mode in torch_modes:
        out.update(
            torch_figures(mode, tokens_per_sec.get(mode), failures.get(mode), note, ours, per_token, peak)
        )
    return out


def torch_figures(
    mode: str,
    theirs: float | None,
    why: str | None,
    note: str,
    ours: float,
    flops_per_token: float,
    peak: float,
) -> dict:
    """One baseline mode's tokens/s and MFU (our FLOPs/token and roof) and our tokens/s over theirs
    (`vs_torch_<mode>`); Figures holding `why` when the mode could not run."""
    names = (f"torch_{mode}_tokens_per_sec", f"torch_{mode}_mfu", f"vs_torch_{mode}")
    if theirs is None:
        return {name: Figure(None, why) for name in names}
    return dict(zip(names, (Figure(theirs, note), theirs * flops_per_token / peak, ours / theirs)))


def peak_memory() -> dict:
    """Peak memory: the device's own counter where it has one, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": Figure(stats["peak_bytes_in_use"], "device peak_bytes_in_use")}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_memory_bytes": Figure(rss, "process peak RSS (ru_maxrss): runtime, compilation and step")}


# (remat, grad_accum) variants of --sweep_memory: one axis at a time from (none, 1).
SWEEP = (("none", 1), ("dots", 1), ("full", 1), ("none", 2), ("none", 4))
SWEEP_FIGURES = ("tokens_per_sec", "mfu", "step_temp_bytes", "peak_memory_bytes")


def sweep_memory(config_args: list, steps_per_repeat: int, repeats: int, matmul_n: int = 2048) -> list:
    """Runs `train` (without the PyTorch baseline) for each SWEEP variant in a fresh subprocess: a
    process's peak RSS only grows, and a device's peak counter is per process.

    Args:
      config_args: the command line's `--config FILE` and `--config.KEY=VALUE` arguments; the
        variant's remat and grad_accum overrides come after them.
    Returns:
      [(variant name, {figure name: Figure})], in SWEEP order; a failed run's Figures hold its error.
    """
    rows = []
    for remat, accum in SWEEP:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "figures.jsonl")
            cmd = [
                sys.executable,
                "-m",
                "tools.bench",
                "train",
                *config_args,
                f"--config.model.remat={remat}",
                f"--config.train.grad_accum={accum}",
                "--torch",
                "none",
                "--steps",
                str(steps_per_repeat),
                "--repeats",
                str(repeats),
                "--matmul_n",
                str(matmul_n),
                "--json",
                path,
            ]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                why = (result.stderr.strip().splitlines() or ["failed"])[-1][:300]
                got = {name: Figure(None, why) for name in SWEEP_FIGURES}
            else:
                records = [json.loads(line) for line in open(path)]
                got = {
                    r["name"]: Figure(r["value"], r.get("note", ""))
                    for r in records
                    if r["name"] in SWEEP_FIGURES
                }
        rows.append((f"remat={remat} grad_accum={accum}", got))
    return rows


def decode_prompts(vocab: int, batch: int, bucket: int, seed: int = 0) -> list:
    """`batch` prompts of random token ids, lengths in [bucket // 2 + 1, bucket]: one padded bucket."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(bucket // 2 + 1, bucket + 1, size=batch)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block; yields a one-element list holding the count."""
    count = [0]

    def listener(event, seconds, **kwargs):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def bench_decode(config, new_tokens: int = 256, repeats: int = 3) -> dict:
    """Greedy generation tokens/s with the KV cache and by full recomputation, for `config`'s batch
    size of prompts and `new_tokens` each (EOS never stops a row), random initial parameters.

    A learned position table too short for the prompt bucket + `new_tokens` is lengthened (the
    `context` figure); nothing else about the model changes.
    """
    vocab = config.model.vocab_size or config.tokenizer.vocab_size
    model_cfg = model_config(config, vocab)
    bucket = sampling.PROMPT_BUCKET
    if model_cfg.kind == "transformer" and model_cfg.positions == "learned":
        model_cfg = model_cfg.replace(max_seq_len=max(model_cfg.max_seq_len, bucket + new_tokens))
    params = nn.unbox(
        build_model(model_cfg).init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 8), jnp.int32))
    )
    prompts = decode_prompts(vocab, config.train.global_batch_size, bucket)
    out = {"new_tokens": new_tokens, "prompts": len(prompts), "context": model_cfg.max_seq_len}
    timed_compiles = 0
    for name, generate in (("cache", sampling.generate), ("recompute", sampling.generate_recompute)):
        run = lambda: generate(
            params,
            model_cfg,
            prompts,
            max_new_tokens=new_tokens,
            rng=jax.random.PRNGKey(0),
            temperature=0.0,
            eos_id=-1,
        )
        with count_compiles() as warm_up:
            generated = sum(len(c) for c in run())
        with count_compiles() as again:
            seconds = statistics.median(timed(run, repeats))
        out[f"{name}_tokens_per_sec"] = generated / seconds
        out[f"{name}_compiles"] = warm_up[0]
        timed_compiles += again[0]
    out["timed_compiles"] = timed_compiles
    out["cache_vs_recompute"] = out["cache_tokens_per_sec"] / out["recompute_tokens_per_sec"]
    return out


# Relative to the project root (the checkout holding tools/), wherever the bench is run from.
EPOCH_CSV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "data",
    "chinchilla_epoch_svg_extracted_data.csv",
)


def fit_data(csv_path: str):
    """(N, D, loss [n], name): the Epoch data less its 5 highest losses (as in their refit) when
    the file exists, else 240 points drawn from a known law (E, A, B, alpha, beta = 1.9, 500,
    1500, 0.35, 0.32) with 0.4% multiplicative noise."""
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        N = np.array([float(r["Model Size"]) for r in rows])
        C = np.array([float(r["Training FLOP"]) for r in rows])
        loss = np.array([float(r["loss"]) for r in rows])
        keep = np.sort(np.argsort(loss)[:-5])
        return N[keep], C[keep] / (6 * N[keep]), loss[keep], "epoch"
    N, D = (v.ravel() for v in np.meshgrid(np.logspace(7, 10, 16), np.logspace(8.5, 11.5, 15)))
    noise = np.exp(np.random.default_rng(0).normal(0, 0.004, N.shape))
    return N, D, (1.9 + 500 / N**0.35 + 1500 / D**0.32) * noise, "synthetic"


def bench_fit(N, D, loss, repeats: int = 3) -> dict:
    """Seconds of the vectorised Approach 3 fit over Epoch's 4,500 starts (median of `repeats`
    after a first call; compile_seconds is that first call less the median), of the variable
    projection fit (median of `repeats`; numpy, nothing to compile) and of the scipy L-BFGS-B loop
    over the same starts (once), with their best objectives."""
    t = time.perf_counter()
    chinchilla.fit_approach3(N, D, loss)
    first = time.perf_counter() - t
    fits = []
    seconds = statistics.median(timed(lambda: fits.append(chinchilla.fit_approach3(N, D, loss)), repeats))
    projected = []
    varpro_seconds = statistics.median(
        timed(lambda: projected.append(varpro.fit_approach3_varpro(N, D, loss)), repeats)
    )
    t = time.perf_counter()
    ref = chinchilla.fit_approach3_scipy(N, D, loss)
    scipy_seconds = time.perf_counter() - t
    return {
        "fit_seconds": seconds,
        "varpro_fit_seconds": varpro_seconds,
        "scipy_fit_seconds": scipy_seconds,
        "speedup": scipy_seconds / seconds,
        "compile_seconds": first - seconds,
        "objective": fits[-1].objective,
        "varpro_objective": projected[-1].objective,
        "scipy_objective": ref.objective,
        "starts": len(chinchilla.grid_starts()),
        "points": len(loss),
    }


def bench_nf4(config) -> dict:
    """Bytes per parameter of the model's Linear kernels in NF4 (QLoRA's frozen base) vs float32."""
    model = build_model(model_config(config, config.model.vocab_size or 4096))
    params = sharding.unboxed(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    )
    flat = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if lora.is_linear_kernel(tuple(getattr(k, "key", k) for k in path))
    ]
    kernels = [
        jax.random.normal(jax.random.PRNGKey(i), leaf.shape, jnp.float32) * 0.02
        for i, (_, leaf) in enumerate(flat)
    ]
    n = sum(k.size for k in kernels)
    single = sum(quant.quantize(k).nbytes for k in kernels)
    double = sum(quant.quantize(k, double_quant=True).nbytes for k in kernels)
    return {
        "quantized_params": n,
        "float32_bytes_per_param": 4.0,
        "nf4_bytes_per_param": single / n,
        "nf4_double_quant_bytes_per_param": double / n,
        "nf4_compression": 4.0 * n / single,
    }


UNITS = {
    "peak_flops": "FLOP/s",
    "model_flops_per_sec": "FLOP/s",
    "tokens_per_sec": "tokens/s",
    "mfu": "fraction",
    "step_seconds": "s",
    "compile_seconds": "s",
    "params": "count",
    "peak_memory_bytes": "bytes",
    "step_temp_bytes": "bytes",
    "nominal_peak_flops": "FLOP/s",
    "mfu_nominal": "fraction",
    "torch_peak_flops": "FLOP/s",
    "torch_eager_tokens_per_sec": "tokens/s",
    "torch_eager_mfu": "fraction",
    "vs_torch_eager": "x",
    "torch_compile_tokens_per_sec": "tokens/s",
    "torch_compile_mfu": "fraction",
    "vs_torch_compile": "x",
    "new_tokens": "count",
    "prompts": "count",
    "context": "count",
    "cache_tokens_per_sec": "tokens/s",
    "recompute_tokens_per_sec": "tokens/s",
    "cache_compiles": "count",
    "recompute_compiles": "count",
    "timed_compiles": "count",
    "cache_vs_recompute": "x",
    "fit_seconds": "s",
    "varpro_fit_seconds": "s",
    "scipy_fit_seconds": "s",
    "speedup": "x",
    "objective": "sum Huber",
    "varpro_objective": "sum Huber",
    "scipy_objective": "sum Huber",
    "starts": "count",
    "points": "count",
    "quantized_params": "count",
    "float32_bytes_per_param": "bytes",
    "nf4_bytes_per_param": "bytes",
    "nf4_double_quant_bytes_per_param": "bytes",
    "nf4_compression": "x",
}


def figures(results: dict) -> list:
    """[(name, Figure)] of the results that have a unit, in order; plain numbers get an empty note."""
    return [(k, v if isinstance(v, Figure) else Figure(v)) for k, v in results.items() if k in UNITS]


def write_json(json_path: str, bench: str, name: str, rows: list, **fields) -> None:
    """Appends one JSON object per (name, Figure): bench, name, value (null if missing), unit, config,
    any extra `fields`, and the figure's note."""
    with open(json_path, "a") as f:
        for k, fig in rows:
            record = {
                "bench": bench,
                "name": k,
                "value": fig.value,
                "unit": UNITS[k],
                "config": name,
                **fields,
            }
            f.write(json.dumps({**record, **({"note": fig.note} if fig.note else {})}) + "\n")


def report(bench: str, name: str, results: dict, json_path: str | None) -> None:
    """Prints a short table; with `json_path`, appends one JSON object per figure."""
    print(f"{bench} ({name}) on {jax.devices()[0].device_kind} x{jax.device_count()}")
    rows = figures(results)
    for k, fig in rows:
        value = "-" if fig.value is None else f"{fig.value:.4g}"
        note = f"  ({fig.note})" if fig.note else ""
        print(f"  {k:<30} {value:>12} {UNITS[k]}{note}")
    if json_path:
        write_json(json_path, bench, name, rows)


def report_sweep(name: str, rows: list, json_path: str | None) -> None:
    """Prints the --sweep_memory table (one row per variant); with `json_path`, appends its figures
    as bench "train_sweep" objects with a "variant" field."""
    print(f"train --sweep_memory ({name}), each variant in a fresh process")
    print(f"  {'variant':<24}" + "".join(f"{k:>20}" for k in SWEEP_FIGURES))
    for variant, figs in rows:
        cells = [figs.get(k, Figure(None)).value for k in SWEEP_FIGURES]
        print(f"  {variant:<24}" + "".join(f"{'-' if v is None else f'{v:.4g}':>20}" for v in cells))
    notes = {fig.note for _, figs in rows for fig in figs.values() if fig.note}
    for note in sorted(notes):
        print(f"  note: {note}")
    if json_path:
        for variant, figs in rows:
            write_json(
                json_path,
                "train_sweep",
                name,
                [(k, figs[k]) for k in SWEEP_FIGURES if k in figs],
                variant=variant,
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmarks: matmul roof, train-step throughput and MFU, "
        "decoding, the scaling-law fit, NF4 storage.",
        allow_abbrev=False,
    )
    p.add_argument("bench", choices=["matmul", "train", "decode", "fit", "nf4"])
    p.add_argument(
        "--config",
        default=None,
        help="config file[:arg] (train, decode, nf4); default: the "
        "reference model. --config.KEY=VALUE overrides a key",
    )
    p.add_argument("--json", default=None, help="append one JSON object per figure to this file")
    p.add_argument("--dtype", default="float32", help="matmul: the dtype of the roof")
    p.add_argument("--matmul_n", type=int, default=2048, help="matmul, train: the roof's square size")
    p.add_argument("--steps", type=int, default=5, help="train: steps per timed repeat")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default: train 5, decode 3, fit 3)"
    )
    p.add_argument("--torch", default="eager,compile", help="train: PyTorch baseline modes, or 'none'")
    p.add_argument(
        "--nominal_peak",
        type=float,
        default=0.0,
        help="train: data-sheet FLOP/s per device for "
        "mfu_nominal (default: the table in lm/flops.py for bfloat16 models)",
    )
    p.add_argument(
        "--sweep_memory",
        action="store_true",
        help="train: remat none/dots/full and grad_accum "
        "1/2/4, each in a fresh subprocess: peak memory against tokens/s",
    )
    p.add_argument("--new_tokens", type=int, default=256, help="decode: tokens generated per prompt")
    p.add_argument(
        "--csv",
        default=EPOCH_CSV,
        help="Epoch's Chinchilla data (fit; default "
        "../shared/data/chinchilla_epoch_svg_extracted_data.csv from the project root); synthetic if absent",
    )
    args, items = p.parse_known_args(argv)
    bad = [o for o in items if not o.startswith("--config.") or "=" not in o]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --config.KEY=VALUE)")
    try:
        config = load_config(args.config, items) if args.bench in ("train", "decode", "nf4") else None
    except (ValueError, UserError) as e:
        p.error(str(e))
    name = " ".join([args.config or "reference"] + [o.removeprefix("--config.") for o in items])
    if args.bench == "matmul":
        report("matmul", args.dtype, bench_matmul(args.dtype, args.matmul_n, args.repeats or 7), args.json)
    elif args.bench == "nf4":
        report("nf4", name, bench_nf4(config), args.json)
    elif args.bench == "fit":
        *data, fit_name = fit_data(args.csv)
        report("fit", f"approach3-{fit_name}", bench_fit(*data, repeats=args.repeats or 3), args.json)
    elif args.bench == "decode":
        report("decode", name, bench_decode(config, args.new_tokens, args.repeats or 3), args.json)
    elif args.sweep_memory:
        config_args = (["--config", args.config] if args.config else []) + items
        report_sweep(name, sweep_memory(config_args, args.steps, args.repeats or 5, args.matmul_n), args.json)
    else:
        modes = tuple(m for m in args.torch.split(",") if m and m != "none")
        if set(modes) - {"eager", "compile"}:
            p.error(f"--torch={args.torch}: expected eager, compile, both (comma-separated) or none")
        report(
            "train",
            name,
            bench_train(config, args.steps, args.repeats or 5, modes, args.matmul_n, args.nominal_peak),
            args.json,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
