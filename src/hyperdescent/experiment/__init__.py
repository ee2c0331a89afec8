"""Experiments: TOML configs, run directories, method runners and the compare harness."""

from .compare import compare, results_table, run
from .config import Config, dump_config, load_config, validate_config
from .rundir import RunDir, read_records
from .runners import run_method

__all__ = ["Config", "load_config", "dump_config", "validate_config", "RunDir", "read_records",
           "compare", "run", "run_method", "results_table"]
