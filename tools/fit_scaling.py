"""Fit compute-optimal scaling laws (Hoffmann et al. 2022, Approaches 1-3) to a CSV of runs.

python -m tools.fit_scaling RESULTS.csv --approach 1|2|3 [--solver lbfgs|varpro] [--bootstrap 1000]
    [--budgets 1e21,1e23] [--drop_highest K] [--format markdown|latex|json] [--plot out.png]
    [--n_col N] [--d_col D] [--c_col C] [--loss_col eval_loss] [--budget_col budget]

The defaults read a sweep's results.csv: completed rows only, N = total parameters (Chinchilla's
choice; `--n_col N_nonembedding` gives Kaplan's), loss = eval_loss. Without a D column,
D = C / (6 N); without a C column, C = 6 N D. Approach 2 groups runs by `--budget_col` (default
`budget` where that column exists, else C values within 10% of each other). Approach 1 reads each
run's training-loss curve from `<csv dir>/<name>/metrics.jsonl`. `--budgets` sets the FLOP
budgets of the allocation table (default: the data's budgets, else powers of ten over its C).
"""

import argparse
import json
import os
import sys

import numpy as np

from lm.errors import UserError
from lm.scaling import bootstrap, chinchilla, results, tables, varpro


def parse_budgets(text: str | None) -> list[float] | None:
    """'1e21,1e23' -> [1e21, 1e23]; None stays None."""
    if text is None:
        return None
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(
            f"--budgets must be comma-separated FLOP counts like 1e21,1e23; got {text!r}"
        ) from None
    if not budgets or any(not np.isfinite(b) or b <= 0 for b in budgets):
        raise UserError(f"--budgets must be positive FLOP counts; got {text!r}")
    return budgets


def default_budgets(C, budget) -> list[float]:
    """The data's own budgets (budget [n], or None) if it has them, else powers of ten over C [n]."""
    if budget is not None:
        return sorted(float(b) for b in np.unique(budget))
    lo, hi = np.floor(np.log10(C.min())), np.ceil(np.log10(C.max()))
    return [float(10**k) for k in np.arange(lo, hi + 1)]


def load(args):
    """(table, kept row indices [n], then N, D, C, loss [n] and budget [n] or None of those rows):
    completed rows, less the --drop_highest highest losses."""
    table = results.read_table(args.csv)
    N, D, C, loss = results.fit_inputs(table, args.n_col, args.loss_col, args.d_col, args.c_col)
    budget = None
    budget_col = args.budget_col or next(
        (c for c in ("budget", "scaling.budget") if c in table.columns), None
    )
    if budget_col:
        budget = results.column(table, budget_col)
    keep = results.without_highest(loss, args.drop_highest)
    return table, keep, N[keep], D[keep], C[keep], loss[keep], None if budget is None else budget[keep]


def run_approach1(args, table, keep, N, D, C, loss, budgets):
    """Approach 1 on the kept runs' curves: (fit, quantities, bootstrap samples over runs, curves)."""
    results.require_column(table, "name", " (Approach 1 reads <csv dir>/<name>/metrics.jsonl)")
    names = [table.rows[i]["name"] for i in keep]
    curves = results.read_curves(args.csv, names, N, D, C)
    fit = chinchilla.fit_approach1(*curves)

    def quantities(runs):
        rows = [np.nonzero(curves[0] == r)[0] for r in runs]
        draw = np.concatenate([np.full(len(ix), j) for j, ix in enumerate(rows)])
        ix = np.concatenate(rows)
        f = chinchilla.fit_approach1(draw, *(v[ix] for v in curves[1:]))
        return chinchilla.power_law_quantities(f.k_N, f.a, f.k_D, f.b, budgets)

    samples = (
        bootstrap.bootstrap_rows(quantities, len(names), args.bootstrap, args.seed) if args.bootstrap else {}
    )
    return fit, chinchilla.power_law_quantities(fit.k_N, fit.a, fit.k_D, fit.b, budgets), samples, curves


def run_approach2(args, N, D, C, loss, budget, budgets):
    """Approach 2 on runs [n]: (fit, quantities, bootstrap samples over runs, budgets of the table).
    D: [n] the runs' tokens when the CSV has them (D_opt is then read off the runs), else None."""
    fit = chinchilla.fit_approach2(N, C, loss, budget, D=D)
    budgets = [float(c) for c in fit.C] if budgets is None else budgets

    def quantities(rows):
        f = chinchilla.fit_approach2(
            N[rows],
            C[rows],
            loss[rows],
            None if budget is None else budget[rows],
            D=None if D is None else D[rows],
        )
        return chinchilla.power_law_quantities(f.k_N, f.a, f.k_D, f.b, budgets, G=f.k_N * 6**f.a)

    samples = (
        bootstrap.bootstrap_rows(quantities, len(N), args.bootstrap, args.seed) if args.bootstrap else {}
    )
    point = chinchilla.power_law_quantities(fit.k_N, fit.a, fit.k_D, fit.b, budgets, G=fit.k_N * 6**fit.a)
    return fit, point, samples, budgets


def run_approach3(args, N, D, loss, budgets):
    """Approach 3 on points [n] by `args.solver`: (fit, quantities, vectorised bootstrap samples)."""
    fit = SOLVERS[args.solver or "lbfgs"](N, D, loss)
    samples = (
        bootstrap.bootstrap_approach3(N, D, loss, fit, budgets, args.bootstrap, args.seed)
        if args.bootstrap
        else {}
    )
    return fit, chinchilla.approach3_quantities(fit.E, fit.A, fit.B, fit.alpha, fit.beta, budgets), samples


SOLVERS = {"lbfgs": chinchilla.fit_approach3, "varpro": varpro.fit_approach3_varpro}
PARAMS = {1: ("k_N", "a", "k_D", "b"), 2: ("k_N", "a", "k_D", "b"), 3: ("E", "A", "B", "alpha", "beta")}


def fit_and_render(args) -> str:
    """Runs the fit `args` ask for; returns the text to print (and writes the plot)."""
    if args.bootstrap < 0 or not 0 < args.level < 1:
        raise UserError("--bootstrap must be >= 0 and --level in (0, 1)")
    if args.solver and args.approach != 3:
        raise UserError(f"--solver applies to --approach 3 only; got --approach {args.approach}")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise UserError(f"--plot {args.plot}: no such directory")
    budgets = parse_budgets(args.budgets)
    table, keep, N, D, C, loss, budget = load(args)
    extra = None
    if args.approach == 1:
        budgets = default_budgets(C, budget) if budgets is None else budgets
        fit, point, samples, extra = run_approach1(args, table, keep, N, D, C, loss, budgets)
    elif args.approach == 2:
        tokens = D if args.d_col or "D" in table.columns else None  # else D = C / (6N) already
        fit, point, samples, budgets = run_approach2(args, N, tokens, C, loss, budget, budgets)
    else:
        budgets = default_budgets(C, budget) if budgets is None else budgets
        fit, point, samples = run_approach3(args, N, D, loss, budgets)
    intervals = bootstrap.percentile_intervals(samples, args.level)
    if args.plot:
        plot(args.plot, args.approach, fit, N, D, C, loss, budget, extra)
    names = PARAMS[args.approach]
    if args.format == "json":
        return json.dumps(tables.to_json(point, intervals, names, budgets)) + "\n"
    render = tables.markdown if args.format == "markdown" else tables.latex
    return render(point, intervals, names, budgets, args.level)


def _groups(x, budget=None):
    """[(label value, member indices)] of x [n] clustered within 10% (or by budget [n])."""
    if budget is not None:
        return [(b, np.nonzero(budget == b)[0]) for b in np.unique(budget)]
    group, centres = chinchilla.group_budgets(x)
    return [(c, np.nonzero(group == k)[0]) for k, c in enumerate(centres)]


def plot(path, approach, fit, N, D, C, loss, budget, curves) -> None:
    """Writes a figure to `path`: loss against compute with the compute-optimal frontier; the
    IsoFLOP profiles with their fitted curves (for data without budgets, loss against N per D);
    and N_opt, D_opt against C with their power laws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_n, ax_opt) = plt.subplots(1, 3, figsize=(16, 4.8))
    c_all = curves[3] if approach == 1 else C
    c_line = np.logspace(np.log10(c_all.min()), np.log10(c_all.max()), 100)
    if approach == 1:
        run, n_pts, _, c_pts, l_pts = curves
        shade = matplotlib.colors.LogNorm(N.min(), N.max())
        for r in np.unique(run):
            m = run == r
            ax_c.plot(c_pts[m], l_pts[m], lw=0.8, color=plt.cm.viridis(shade(n_pts[m][0])))
        ax_c.plot(fit.C, fit.loss, "k.-", label="min-loss envelope")
        ax_n.scatter(N, loss, s=12)
        ax_n.set_title("final loss against N")
    else:
        points = ax_c.scatter(C, loss, c=np.log10(N), s=12, cmap="viridis")
        fig.colorbar(points, ax=ax_c, label="log10 N")
    if approach == 2:
        ax_c.plot(
            [p.C for p in fit.parabolas if p.valid],
            [p.loss_opt for p in fit.parabolas if p.valid],
            "k.-",
            label="IsoFLOP minima",
        )
        members = {float(value): ix for value, ix in _groups(C, budget)}
        for p in fit.parabolas:
            m = members[p.C]
            x = np.linspace(*p.log_n_range, 50)
            (line,) = ax_n.plot(np.exp(x), np.polyval(p.coeffs, x), lw=1)
            ax_n.scatter(N[m], loss[m], s=12, color=line.get_color(), label=f"C={p.C:.2g}")
            if p.valid:
                ax_n.plot(p.N_opt, p.loss_opt, "kx")
        ax_n.set_title("IsoFLOP profiles")
    if approach == 3:
        q = chinchilla.approach3_quantities(fit.E, fit.A, fit.B, fit.alpha, fit.beta)
        n_opt, d_opt = q["G"] * (c_line / 6) ** q["a"], (c_line / 6) ** q["b"] / q["G"]
        ax_c.plot(c_line, chinchilla.approach3_loss(fit, n_opt, d_opt), "k-", label="compute-optimal L(C)")
        iso = _groups(C, budget)
        by_budget = budget is not None or sum(len(ix) >= 3 for _, ix in iso) >= 2
        for value, ix in iso if by_budget else _groups(D):
            if by_budget and len(ix) < 3:
                continue
            n_line = np.logspace(np.log10(N[ix].min()), np.log10(N[ix].max()), 50)
            d_line = value / (6 * n_line) if by_budget else np.full_like(n_line, value)
            (line,) = ax_n.plot(n_line, chinchilla.approach3_loss(fit, n_line, d_line), lw=1)
            ax_n.scatter(
                N[ix],
                loss[ix],
                s=12,
                color=line.get_color(),
                label=f"{'C' if by_budget else 'D'}={value:.2g}",
            )
        ax_n.set_title(
            "IsoFLOP profiles, fitted L(N, D)" if by_budget else "loss against N per D, fitted L(N, D)"
        )
    else:
        n_opt, d_opt = fit.k_N * c_line**fit.a, fit.k_D * c_line**fit.b
        ax_opt.scatter(fit.C, fit.N_opt, s=14, color="C0")
        ax_opt.scatter(fit.C, fit.D_opt, s=14, color="C1")
    ax_opt.plot(c_line, n_opt, "C0-", label="N_opt")
    ax_opt.plot(c_line, d_opt, "C1-", label="D_opt")
    ax_opt.set_title("compute-optimal allocation")
    for ax, xlabel, ylabel in (
        (ax_c, "C (FLOPs)", "loss"),
        (ax_n, "N (parameters)", "loss"),
        (ax_opt, "C (FLOPs)", "N_opt, D_opt"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if 0 < len(ax.get_legend_handles_labels()[1]) <= 12:
            ax.legend(fontsize=7)
    ax_opt.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """Parses the command line, fits, prints; a user error prints one `error:` line and returns 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="CSV of runs, e.g. a sweep's results.csv")
    p.add_argument(
        "--approach",
        type=int,
        choices=[1, 2, 3],
        default=3,
        help="1: min-loss envelope of the training curves; 2: IsoFLOP parabolas; "
        "3: parametric L(N, D) (default)",
    )
    p.add_argument(
        "--solver",
        choices=sorted(SOLVERS),
        default=None,
        help="Approach 3: lbfgs, L-BFGS from Epoch's 4,500-start grid (default); varpro, variable "
        "projection over (alpha, beta)",
    )
    p.add_argument("--bootstrap", type=int, default=0, help="resamples for confidence intervals (0: none)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    p.add_argument("--budgets", default=None, help="comma-separated FLOP budgets for the allocation table")
    p.add_argument("--drop_highest", type=int, default=0, help="leave out the K rows with the highest loss")
    p.add_argument("--format", choices=["markdown", "latex", "json"], default="markdown")
    p.add_argument("--plot", default=None, help="write a figure to this .png")
    p.add_argument("--n_col", default="N", help="parameters column (N_nonembedding for Kaplan's N)")
    p.add_argument("--d_col", default=None, help="tokens column (default D if present, else C / (6 N))")
    p.add_argument("--c_col", default=None, help="FLOPs column (default C if present, else 6 N D)")
    p.add_argument("--loss_col", default="eval_loss", help="final loss column")
    p.add_argument("--budget_col", default=None, help="Approach 2 grouping (default: budget if present)")
    args = p.parse_args(argv)
    try:
        out = fit_and_render(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
