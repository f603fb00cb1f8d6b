"""Paper-style output of a fit: markdown and LaTeX tables, and the JSON object other tools read.

Every function takes the fit's quantities by name (`chinchilla.approach3_quantities` or
`chinchilla.power_law_quantities`), the bootstrap intervals by the same names ({} for none),
the names of the fitted parameters, and the FLOP budgets of the allocation table.
"""

import math

from lm.scaling.chinchilla import budget_key

ALLOCATION = ("a", "b", "G")
BUDGET_COLUMNS = ("N_opt", "D_opt", "tokens_per_param", "loss")
_HEADERS = {"N_opt": "N_opt", "D_opt": "D_opt", "tokens_per_param": "tokens/param", "loss": "loss"}


def _number(v):
    """float(v), or None where v is missing or not finite (JSON has no NaN)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def to_json(quantities: dict, intervals: dict, param_names, budgets) -> dict:
    """{"params", "intervals", "allocation": {"a", "b", "G"}, "budgets": [{"C", "N_opt", "D_opt",
    "tokens_per_param", "loss"}]}; undefined values are None."""
    return {
        "params": {k: _number(quantities[k]) for k in param_names},
        "intervals": {k: [_number(lo), _number(hi)] for k, (lo, hi) in intervals.items()},
        "allocation": {k: _number(quantities.get(k)) for k in ALLOCATION},
        "budgets": [
            {"C": float(c), **{k: _number(quantities[budget_key(k, c)]) for k in BUDGET_COLUMNS}}
            for c in budgets
        ],
    }


def _rows(quantities: dict, intervals: dict, param_names, budgets):
    """(param rows [(name, value, interval)], budget rows [(C, [(value, interval)] per column)])."""
    names = list(param_names) + [k for k in ALLOCATION if k not in param_names]
    params = [
        (k, _number(quantities.get(k)), intervals.get(k))
        for k in names
        if _number(quantities.get(k)) is not None
    ]
    rows = [
        (
            c,
            [
                (_number(quantities[budget_key(k, c)]), intervals.get(budget_key(k, c)))
                for k in BUDGET_COLUMNS
            ],
        )
        for c in budgets
    ]
    return params, rows


def _plain(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _plain_ci(v, ci) -> str:
    return _plain(v) if ci is None else f"{_plain(v)} [{_plain(ci[0])}, {_plain(ci[1])}]"


def markdown(quantities: dict, intervals: dict, param_names, budgets, level: float = 0.95) -> str:
    """Two markdown tables: fitted quantities with their intervals, and the allocation per budget."""
    params, rows = _rows(quantities, intervals, param_names, budgets)
    ci = f"{100 * level:g}% CI"
    out = ["| quantity | estimate | " + ci + " |", "|---|---:|---:|"]
    out += [
        f"| {k} | {_plain(v)} | " + ("-" if i is None else f"[{_plain(i[0])}, {_plain(i[1])}]") + " |"
        for k, v, i in params
    ]
    if rows:
        out += [
            "",
            "| C (FLOPs) | " + " | ".join(_HEADERS[k] for k in BUDGET_COLUMNS) + " |",
            "|---:|" + "---:|" * len(BUDGET_COLUMNS),
        ]
        out += [f"| {c:.3g} | " + " | ".join(_plain_ci(v, i) for v, i in cells) + " |" for c, cells in rows]
        if intervals:
            out += ["", f"Brackets: bootstrap {ci}."]
    return "\n".join(out) + "\n"


def _tex(v) -> str:
    """A number in LaTeX math: 4 significant digits, powers of ten as \\times 10^{k}."""
    if v is None:
        return "--"
    mantissa, _, exponent = f"{v:.4g}".partition("e")
    return f"${mantissa}$" if not exponent else f"${mantissa} \\times 10^{{{int(exponent)}}}$"


_TEX_NAMES = {"alpha": r"$\alpha$", "beta": r"$\beta$", "k_N": "$k_N$", "k_D": "$k_D$"}


def latex(quantities: dict, intervals: dict, param_names, budgets, level: float = 0.95) -> str:
    """Two LaTeX tabulars (booktabs): fitted quantities with intervals, and the allocation per budget."""
    params, rows = _rows(quantities, intervals, param_names, budgets)
    ci = f"{100 * level:g}\\% CI"
    out = [r"\begin{tabular}{lrr}", r"\toprule", f"Quantity & Estimate & {ci} \\\\", r"\midrule"]
    out += [
        f"{_TEX_NAMES.get(k, f'${k}$')} & {_tex(v)} & "
        + ("--" if i is None else f"[{_tex(i[0])}, {_tex(i[1])}]")
        + r" \\"
        for k, v, i in params
    ]
    out += [r"\bottomrule", r"\end{tabular}"]
    if rows:
        cell = lambda v, i: _tex(v) if i is None else f"{_tex(v)} [{_tex(i[0])}, {_tex(i[1])}]"
        out += [
            "",
            r"\begin{tabular}{r" + "r" * len(BUDGET_COLUMNS) + "}",
            r"\toprule",
            r"FLOPs & $N_{opt}$ & $D_{opt}$ & Tokens/param & Loss \\",
            r"\midrule",
        ]
        out += [f"{_tex(c)} & " + " & ".join(cell(v, i) for v, i in cells) + r" \\" for c, cells in rows]
        out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"
