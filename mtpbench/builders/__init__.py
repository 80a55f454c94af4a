"""Builders of checkpoints and data: the trunk + head module (`net`), tiny test checkpoints (`tiny`), the embedded
default's recipe (`demo`, `tokenizer`), quantization policies as data (`policies`), quantize and graft
(`quantize`), and the long-context prompt file (`longctx`). Importing this package loads nothing; import the
modules."""
