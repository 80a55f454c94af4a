"""The sweep's plan: one table of axes (`axes`), the spec and its cells (`spec`), the servers to measure
(`endpoint`), the one row builder (`rows`), the results store (`store`), prompt sets (`prompts`) and long-context
buckets (`longctx`).

A low wing: backends, stats and the report import it, and it imports none of them; running a plan lives in
`mtpbench.orchestrate`. Importing this package loads nothing, and none of these modules loads mlx, so the report
and the statistics use them where mlx is not installed.
"""
