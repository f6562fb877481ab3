"""Benchmark code that ships in the wheel: ``trl-plw bench`` (``throughput``) and the helpers all benchmarks share.

Not part of the training API: nothing here is imported by the trainer, and importing this package imports nothing
heavy. The other benchmarks (``loss_head``, ``attention``, ``collator``, the one-command GPU check) stay scripts in
the repository's ``benchmarks/`` folder and import their shared helpers from :mod:`trl_plw.experiments.benchmarking.common`.
"""
