"""Statistics on result tables: acceptance, speedup with CIs, and distribution-preservation tests.

Works on pandas/numpy/scipy only (never mlx or the decoder), so it runs wherever parquet can be read.
"""
