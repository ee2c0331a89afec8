"""The hypergradient cost benchmark in parts: the task, the peers, the measurements, the
orchestration of fresh worker processes, and the report (`benchmarks/hypergrad_cost.py` is the
command line)."""
