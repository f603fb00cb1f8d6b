"""Benchmarks measured in one process, after warm-up, as the median of several repeats.

python -m tools.bench matmul [--json OUT]
python -m tools.bench train [--config configs/pretrain/tiny.py[:arg]] [--json OUT]
python -m tools.bench fit [--csv ../shared/data/chinchilla_epoch_svg_extracted_data.csv] [--json OUT]
python -m tools.bench nf4 [--config FILE[:arg]] [--json OUT]

`train` times the real jitted train step (random tokens, so no data preparation) and reports
tokens/s, model FLOP/s (PaLM convention, lm/flops.py) and MFU against the matmul peak measured
in the same process. Without --config it uses the model of the PyTorch reference in the project's
performance notes: GPT-2 style, 6 layers, 6 heads, width 384, vocab 4096, context 256, batch 8, float32.

`nf4` measures what QLoRA's frozen base takes: bytes per parameter of the model's dense kernels
stored in NF4 (single and double-quantised scales) against float32, by `nbytes` of what is stored.

`fit` times the Chinchilla Approach 3 fit (Epoch AI's procedure, 4,500 L-BFGS starts) vectorised in
JAX against the plain loop of scipy L-BFGS-B over the same starts and data, in the same process.
"""
import argparse
import csv
import functools
import importlib.util
import json
import os
import resource
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from lm import flops, lora, quant, sharding
from lm.model import Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.scaling import chinchilla
from lm.tasks.pretrain import lm_loss, model_config
from lm.train_state import init_state, jit_train_step


def load_config(spec: str | None):
    """`path.py[:arg]` -> ConfigDict; None -> the performance-notes reference model."""
    if spec is None:
        c = common.get_base_config()
        c.model.update(num_layers=6, num_heads=6, d_model=384, d_ff=1536, max_seq_len=256, use_bias=False)
        c.tokenizer.vocab_size = 4096
        c.train.update(global_batch_size=8, seq_len=256)
        return c
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


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


def bench_train(config, steps_per_repeat: int = 5, repeats: int = 5) -> dict:
    """Train-step tokens/s, model FLOP/s and MFU for `config`'s model, batch and mesh."""
    vocab = config.model.vocab_size or config.tokenizer.vocab_size
    model_cfg = model_config(config, vocab)
    model = Transformer(model_cfg)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    batch_size, seq_len = config.train.global_batch_size, config.train.seq_len
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                  "segment_ids": np.ones((batch_size, seq_len), np.int32),
                  "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
                  "loss_mask": np.ones((batch_size, seq_len), np.float32)}
    peak = flops.measure_matmul_flops(model_cfg.dtype) * jax.device_count()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = lambda r: model.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"]
        state, shardings = init_state(init, tx, 0, mesh, rules)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        batch = sharding.global_batch(host_batch, batch_sharding)
        loss_fn = functools.partial(lm_loss, model=model, z_loss=config.train.z_loss)
        step = jit_train_step(loss_fn, tx, schedule, config.train.grad_accum, shardings, batch_sharding, mesh)
        t = time.perf_counter()
        step = step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - t
        holder = [state]

        def run_steps():
            for _ in range(steps_per_repeat):
                holder[0], metrics = step(holder[0], batch)
            jax.block_until_ready(metrics)

        run_steps()  # warm-up
        seconds = statistics.median(timed(run_steps, repeats)) / steps_per_repeat
    tokens_per_sec = batch_size * seq_len / seconds
    model_flops = flops.flops_per_token(model_cfg, seq_len) * tokens_per_sec
    return {"tokens_per_sec": tokens_per_sec, "model_flops_per_sec": model_flops, "peak_flops": peak,
            "mfu": model_flops / peak, "step_seconds": seconds, "compile_seconds": compile_seconds,
            "params": flops.param_counts(model_cfg)["total"], **peak_memory()}


def peak_memory() -> dict:
    """Peak memory: the device's own counter where it has one, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": stats["peak_bytes_in_use"], "peak_memory_source": "device"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_source": "process_max_rss"}


# Relative to the project root (the checkout holding tools/), wherever the bench is run from.
EPOCH_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                         "chinchilla_epoch_svg_extracted_data.csv")


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
    return N, D, (1.9 + 500 / N ** 0.35 + 1500 / D ** 0.32) * noise, "synthetic"


def bench_fit(N, D, loss, repeats: int = 3) -> dict:
    """Seconds of the vectorised Approach 3 fit over Epoch's 4,500 starts (median of `repeats`
    after a first call; compile_seconds is that first call less the median) and of the scipy
    L-BFGS-B loop over the same starts (once), with their best objectives."""
    t = time.perf_counter()
    chinchilla.fit_approach3(N, D, loss)
    first = time.perf_counter() - t
    fits = []
    seconds = statistics.median(timed(lambda: fits.append(chinchilla.fit_approach3(N, D, loss)), repeats))
    t = time.perf_counter()
    ref = chinchilla.fit_approach3_scipy(N, D, loss)
    scipy_seconds = time.perf_counter() - t
    return {"fit_seconds": seconds, "scipy_fit_seconds": scipy_seconds, "speedup": scipy_seconds / seconds,
            "compile_seconds": first - seconds, "objective": fits[-1].objective,
            "scipy_objective": ref.objective, "starts": len(chinchilla.grid_starts()), "points": len(loss)}


def bench_nf4(config) -> dict:
    """Bytes per parameter of the model's Linear kernels in NF4 (QLoRA's frozen base) vs float32."""
    model = Transformer(model_config(config, config.model.vocab_size or 4096))
    params = sharding.unboxed(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    flat = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if lora.is_linear_kernel(tuple(getattr(k, "key", k) for k in path))]
    kernels = [jax.random.normal(jax.random.PRNGKey(i), leaf.shape, jnp.float32) * 0.02
               for i, (_, leaf) in enumerate(flat)]
    n = sum(k.size for k in kernels)
    single = sum(quant.quantize(k).nbytes for k in kernels)
    double = sum(quant.quantize(k, double_quant=True).nbytes for k in kernels)
    return {"quantized_params": n, "float32_bytes_per_param": 4.0, "nf4_bytes_per_param": single / n,
            "nf4_double_quant_bytes_per_param": double / n, "nf4_compression": 4.0 * n / single}


UNITS = {"peak_flops": "FLOP/s", "model_flops_per_sec": "FLOP/s", "tokens_per_sec": "tokens/s",
         "mfu": "fraction", "step_seconds": "s", "compile_seconds": "s", "params": "count",
         "peak_memory_bytes": "bytes", "fit_seconds": "s", "scipy_fit_seconds": "s", "speedup": "x",
         "objective": "sum Huber", "scipy_objective": "sum Huber", "starts": "count", "points": "count",
         "quantized_params": "count", "float32_bytes_per_param": "bytes", "nf4_bytes_per_param": "bytes",
         "nf4_double_quant_bytes_per_param": "bytes", "nf4_compression": "x"}


def report(bench: str, name: str, results: dict, json_path: str | None) -> None:
    """Prints a short table; with `json_path`, appends one JSON object per figure."""
    print(f"{bench} ({name}) on {jax.devices()[0].device_kind} x{jax.device_count()}")
    rows = [(k, v) for k, v in results.items() if k in UNITS]
    for k, v in rows:
        print(f"  {k:<34} {v:>12.4g} {UNITS[k]}")
    if json_path:
        with open(json_path, "a") as f:
            for k, v in rows:
                f.write(json.dumps({"bench": bench, "name": k, "value": v, "unit": UNITS[k],
                                    "config": name}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmarks: matmul roof, train-step throughput and MFU.")
    p.add_argument("bench", choices=["matmul", "train", "fit", "nf4"])
    p.add_argument("--config", default=None, help="config file[:arg] (train); default: the reference model")
    p.add_argument("--csv", default=EPOCH_CSV, help="Epoch's Chinchilla data (fit; default "
                   "../shared/data/chinchilla_epoch_svg_extracted_data.csv from the project root); synthetic if absent")
    p.add_argument("--json", default=None, help="append one JSON object per figure to this file")
    args = p.parse_args(argv)
    if args.bench == "matmul":
        report("matmul", "float32", bench_matmul(), args.json)
    elif args.bench == "nf4":
        report("nf4", args.config or "reference", bench_nf4(load_config(args.config)), args.json)
    elif args.bench == "fit":
        *data, name = fit_data(args.csv)
        report("fit", f"approach3-{name}", bench_fit(*data), args.json)
    else:
        report("train", args.config or "reference", bench_train(load_config(args.config)), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
