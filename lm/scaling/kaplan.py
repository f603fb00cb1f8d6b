"""Kaplan et al. 2020 power laws: L(N), L(D), L(C) fitted in log space, and the joint L(N, D).

L(X) = (X_c / X)^alpha_X                                (X = N, D or C)
L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D
"""

from typing import NamedTuple

import numpy as np
from scipy import optimize

# Kaplan et al.'s own values (their Table 1 / eq. 1.5), used as one start of the joint fit.
KAPLAN_ALPHA_N, KAPLAN_ALPHA_D, KAPLAN_NC, KAPLAN_DC = 0.076, 0.095, 8.8e13, 5.4e13


class SinglePowerLaw(NamedTuple):
    """L(X) = (X_c / X)^alpha."""

    X_c: float
    alpha: float


class JointLaw(NamedTuple):
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D."""

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float


def fit_power_law(x, y) -> tuple[float, float]:
    """Least squares of log y = log k + p log x; x, y: [n] positive. Returns (k, p), y ~ k x^p."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    p, log_k = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_k)), float(p)


def fit_single(x, loss) -> SinglePowerLaw:
    """Fits L = (X_c / X)^alpha to x: [n] (N, D or C) and loss: [n], in log space."""
    k, p = fit_power_law(x, loss)
    alpha = -p
    return SinglePowerLaw(X_c=float(np.exp(np.log(k) / alpha)), alpha=alpha)


def single_loss(law: SinglePowerLaw, x):
    """(X_c / x)^alpha for x: [...]."""
    return (law.X_c / np.asarray(x, np.float64)) ** law.alpha


def joint_log_loss(N, D, log_nc, log_dc, alpha_n, alpha_d):
    """log L(N, D) of the joint law for N, D: [n], computed without overflow."""
    return alpha_d * np.logaddexp((alpha_n / alpha_d) * (log_nc - np.log(N)), log_dc - np.log(D))


def joint_loss(law: JointLaw, N, D):
    """L(N, D) of `law` for N, D: [...]."""
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return np.exp(joint_log_loss(N, D, np.log(law.N_c), np.log(law.D_c), law.alpha_N, law.alpha_D))


def fit_joint(N, D, loss) -> JointLaw:
    """Fits the joint L(N, D) to N, D, loss: [n] by least squares on log L.

    Starts from the single-variable fits (where their exponents are positive) and from Kaplan et
    al.'s values; keeps the lower cost.
    """
    N, D, loss = (np.asarray(v, np.float64) for v in (N, D, loss))
    log_l = np.log(loss)
    ln_, ld_ = fit_single(N, loss), fit_single(D, loss)
    starts = [
        (np.log(ln_.X_c), np.log(ld_.X_c), ln_.alpha, ld_.alpha),
        (np.log(KAPLAN_NC), np.log(KAPLAN_DC), KAPLAN_ALPHA_N, KAPLAN_ALPHA_D),
    ]
    residual = lambda p: joint_log_loss(N, D, *p) - log_l
    bounds = ([-np.inf, -np.inf, 1e-6, 1e-6], [np.inf, np.inf, np.inf, np.inf])
    fits = [optimize.least_squares(residual, s, bounds=bounds) for s in starts if s[2] > 0 and s[3] > 0]
    best = min(fits, key=lambda r: r.cost)
    log_nc, log_dc, alpha_n, alpha_d = best.x
    return JointLaw(float(np.exp(log_nc)), float(np.exp(log_dc)), float(alpha_n), float(alpha_d))
