"""The performance wing: what `mtpbench bench` measures, one job per module (`perf.bench` runs them all).

settings (sizes, prompts), large (the generated large checkpoint), costs (cost terms), runs (ABBA decode runs),
parity (AR vs mlx_lm), efficiency (the cost model: predicted vs realized), overhead (records), roofline, context
(context scaling), sampling_cost (sampled vs greedy), blas (reference-BLAS child), summary (printed lines),
doctor (`mtpbench doctor`: the instrument checked on this machine and checkpoint).
"""
