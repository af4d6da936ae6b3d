"""Estimation from one trained model: linearization, projections, the
first-order estimators (convex solve, linearized fine-tuning, factored), the
influence-style baselines, and the check of estimates against retraining.
"""
