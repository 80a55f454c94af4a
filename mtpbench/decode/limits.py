"""What a caller may ask of the reference MTP decoder: draft depths 1..MAX_K and the rollback modes.

Pure constants (no numpy, no mlx), so the sweep plan validates `--k` and the verify run picks its rollbacks
without loading the decoder; `speculative.generate_mtp` enforces both.
"""

MAX_K = 16  # the deepest draft chain the reference decoder takes (K drafts per step)
ROLLBACKS = ("capture", "reforward")  # commit a captured prefix | restore a snapshot and re-forward (speculative.py)
