"""Fine-tuning: talking-head videos prepared into a dataset of stage files, and the samples drawn from it."""

from hallo3_cli.training.dataset import Hallo3Dataset, read_manifest, start_range
from hallo3_cli.training.prepare import PrepareResult, check_dataset, find_sources, format_summary, prepare_dataset

__all__ = ["Hallo3Dataset", "PrepareResult", "check_dataset", "find_sources", "format_summary", "prepare_dataset",
           "read_manifest", "start_range"]
