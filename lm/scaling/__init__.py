"""Scaling-law fits: Kaplan et al. 2020 power laws, Hoffmann et al. 2022 Approaches 1-3,
bootstrap intervals and paper-style tables."""
