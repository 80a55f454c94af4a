"""What a checkpoint is and how its forwards run: resolve and load (trunk via mlx_lm, MTP head via safetensors),
the trunk view, per-position state capture, compiled decode layers, the MTP head, the KV-cache spec, `inspect`'s
description, weight bytes for the roofline, and the BLAS set-up.

Importing this package loads nothing (the CLI must choose its BLAS before mlx is imported); import the modules.
"""
