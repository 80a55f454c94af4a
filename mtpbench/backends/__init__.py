"""What a sweep measures, behind one interface (`base.Backend`): the reference decoder (`reference`) and
OpenAI-compatible servers (`server`, with `http` and `metrics`; the servers themselves are the plan's
`sweep.endpoint`). Importing this package loads nothing; import the modules."""
