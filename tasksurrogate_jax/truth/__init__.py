"""Ground truth: retraining over subsets, its reliability (ceilings), the
chunked, resumable, sharded map over subsets, and the content-addressed store.
"""
