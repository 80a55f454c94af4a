"""The sweep: one table of axes, the plan of cells, the one row builder, the results store and the runner.

Importing this package loads nothing: `axes` and `store` are pure (no mlx), so the report and the statistics
import them where mlx is not installed; `run` and the executors load the decoders.
"""
