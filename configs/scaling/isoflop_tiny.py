"""IsoFLOP sweep on the default corpus: 3 FLOP budgets (one decade) × 5 model sizes, ~20 min on 2 CPU cores.

Every member trains one model size for exactly its FLOP budget: `scaling.budget` sets its steps
(counted by the Chinchilla formula, attention and embeddings included) and its cosine schedule ends
there. As in Chinchilla, each budget gets the five sizes of a ladder that bracket its expected
optimum, one rung further up per half decade. The vocabulary is small (512) so that embeddings are a
minority of N from the third rung on. Budgets and sizes are fixed here, before the sweep runs;
nothing is dropped after seeing results.

  python -m experiments.run --config configs/scaling/isoflop_tiny.py --workdir runs/isoflop_tiny
  python -m tools.fit_scaling runs/isoflop_tiny/results.csv --approach 2 --bootstrap 1000
"""

from configs import common

BUDGETS = (4e11, 1.3e12, 4e12)  # training FLOPs
# (num_layers, d_model), heads of 16 dimensions, d_ff = 4 · d_model: 14k to 875k parameters.
LADDER = ((1, 16), (1, 32), (2, 32), (2, 48), (3, 64), (4, 96), (4, 128))
SIZES_PER_BUDGET = 5


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.pretrain_config()
    c.tokenizer.vocab_size = 512
    c.model.max_seq_len = 128
    c.train.seq_len = 128
    c.train.global_batch_size = 8  # small models at small budgets gain more from steps than batch
    c.optimizer.lr = 3e-3
    c.schedule.warmup_fraction = 0.05
    c.scaling.flops = "chinchilla"
    c.scaling.budget = BUDGETS[0]
    c.train.log_every = 50
    c.train.eval_every = 0  # evaluated once, at the end of its budget
    c.train.eval_batches = 64  # the same 64 × 8 × 128 held-out tokens for every member
    c.train.checkpoint_every = 1000
    c.train.num_samples = 0
    if a.smoke:
        c.train.eval_batches = 4
    return c


def model_size(num_layers: int, d_model: int) -> dict:
    """The overrides of one ladder rung."""
    return {
        "model.num_layers": num_layers,
        "model.d_model": d_model,
        "model.num_heads": d_model // 16,
        "model.d_ff": 4 * d_model,
    }


def get_sweep(arg=None):
    a = common.parse_arg(arg, smoke=False)
    if a.smoke:  # seconds: one small budget, two sizes
        return common.product(common.sweep("scaling.budget", [2e10]), [model_size(*s) for s in LADDER[1:3]])
    members = []
    for i, budget in enumerate(BUDGETS):
        window = LADDER[i : i + SIZES_PER_BUDGET]
        members += common.product(common.sweep("scaling.budget", [budget]), [model_size(*s) for s in window])
    return members
