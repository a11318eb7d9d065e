"""Benchmarks. Each one runs from the repository root either way:

    .venv/bin/python -m bench.NAME [--help]
    .venv/bin/python bench/NAME.py [--help]

Run as a file, Python puts bench/ first on sys.path, where a file here would stand in for any top-level
module of the same name (bench/queue.py once shadowed the standard library's `queue`, and `import torch`
failed), and `bench` itself would not import. So each benchmark starts by putting the repository root in
bench/'s place (the guard under `if not __package__:`), which is what `-m bench.NAME` gives. The guard has
to be inline: nothing can be imported from here before the path is right.
"""
