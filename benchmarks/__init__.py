"""Benchmarks of polyreg-cnf, one study per module: `python -m benchmarks.<study> --help`."""
