"""The Best-of-N evaluation stage: greedy pass@1 and N sampled answers per benchmark item, every step scored by a
process reward model, Best-of-k / majority / oracle accuracy, logged to MLflow.

Entry points: `vlpipe.components.evaluate.stage.run_evaluation(config)`, `python -m vlpipe.components.evaluate --config FILE`
and `vlpipe.components.evaluate.cli.eval_command` (`vlpipe eval --config FILE`); a sharded evaluation is
`evaluate_shards` per shard and `merge_evaluation` over the parts (docs/evaluation.md#sharded-evaluation). Importing this package (and its
`config`, `metrics` and `cli` modules) does not import torch.
"""

from vlpipe.components.evaluate.config import BenchmarkSpec, EvalConfig, MLflowSettings, load_eval_config

__all__ = ["BenchmarkSpec", "EvalConfig", "MLflowSettings", "load_eval_config"]
