"""The `dw5d` command: an application built on `dw5d_jax` and `interop`.

Not part of the library API. `cli.py` is the entry point; each subcommand is
a module here (`demo.py` with its learning task `demo_task.py`, `parity.py`,
`export.py`, `bench.py`) defining `configure(parser)` and `run(args)`.
"""
