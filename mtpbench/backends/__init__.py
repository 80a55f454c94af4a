"""What a sweep measures, behind one interface (`base.Backend`): the reference decoder (`reference`) and
OpenAI-compatible servers (`server`, with `endpoint`, `http` and `metrics`). Importing this package loads
nothing; import the modules."""
