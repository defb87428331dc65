"""Fine-tuning Hallo3 as the release trains it (docs/model.md §10; docs/training.md): talking-head videos prepared
into a dataset of stage files and the samples drawn from it (:mod:`.prepare`, :mod:`.dataset`), the conditions of
a step built from a batch (:mod:`.conditions`), the training step and the trainable sets (:mod:`.step`), the
recipe's numbers and schedules (:mod:`.recipe`), validation renders scored while training (:mod:`.validation`), and
the trainer behind ``hallo3 train`` (:mod:`.trainer`, its run folder :mod:`.checkpoint`)."""

from hallo3_cli.training.conditions import condition_frames, step_inputs
from hallo3_cli.training.dataset import Hallo3Dataset, read_manifest, start_range
from hallo3_cli.training.prepare import PrepareResult, check_dataset, find_sources, format_summary, prepare_dataset
from hallo3_cli.training.recipe import (
    RELEASE,
    Recipe,
    decays,
    ema_decay,
    ema_decay_float32,
    learning_rate,
    lr_lambda,
    sample_timesteps,
    timestep_band,
    weight_decay_groups,
)
from hallo3_cli.training.step import (
    RELEASE_RULES,
    TrainingForward,
    TrainRule,
    official_parameter_names,
    trainable_parameters,
    training_forward,
    training_loss,
)
from hallo3_cli.training.trainer import LoraSpec, TrainConfig, TrainResult, train
from hallo3_cli.training.validation import log_scores, validate, validation_paths

__all__ = [
    "RELEASE", "RELEASE_RULES", "Hallo3Dataset", "LoraSpec", "PrepareResult", "Recipe", "TrainConfig", "TrainResult",
    "TrainRule", "TrainingForward", "train",
    "check_dataset", "condition_frames", "decays", "ema_decay", "ema_decay_float32", "find_sources", "format_summary",
    "learning_rate", "log_scores", "lr_lambda", "official_parameter_names", "prepare_dataset", "read_manifest", "sample_timesteps", "start_range",
    "step_inputs", "timestep_band", "trainable_parameters", "training_forward", "training_loss", "validate",
    "validation_paths", "weight_decay_groups",
]
