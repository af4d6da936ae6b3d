"""What a fitted surrogate is used for: attributions and interactions, subset
selection, and uncertainty (intervals, bootstrap).
"""
