"""The Best-of-N evaluation stage: greedy pass@1 and N sampled answers per benchmark item, every step scored by a
process reward model, Best-of-k / majority / oracle accuracy, logged to MLflow.

Entry points: `components.evaluate.run.run_evaluation(config)`, `python -m components.evaluate --config FILE`
and `components.evaluate.cli.eval_command` (`vlpipe eval --config FILE`). Importing this package (and its
`config`, `metrics` and `cli` modules) does not import torch.
"""

from components.evaluate.config import BenchmarkSpec, EvalConfig, MLflowSettings, load_eval_config

__all__ = ["BenchmarkSpec", "EvalConfig", "MLflowSettings", "load_eval_config"]
