"""What a pruned model leaves behind: `recipe.yaml` and `sparsity_report.json` beside the weights, the
sparsity report, the Hub model card and the bit-packed compressed checkpoint."""

from .artifacts import RECIPE_FILE, REPORT_FILE, TRAINING_ARGS_FILE, write_pruning_artifacts, write_training_args
from .card import write_model_card
from .compressed import load_compressed, save_compressed
from .report import LayerSparsity, SparsityReport, sparsity_report

__all__ = [
    "RECIPE_FILE",
    "REPORT_FILE",
    "TRAINING_ARGS_FILE",
    "LayerSparsity",
    "SparsityReport",
    "load_compressed",
    "save_compressed",
    "sparsity_report",
    "write_model_card",
    "write_pruning_artifacts",
    "write_training_args",
]
