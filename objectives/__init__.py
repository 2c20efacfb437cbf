"""vlpipe: objectives.

Pure loss functions and modules: tensors in, named terms out. No I/O, no MLflow, no config files.

- `vlpipe.objectives.config`: the pydantic settings (`LMLossConfig`, `MPOConfig`, `PRMConfig`); imports no torch,
  so pipeline and stage configs can embed them.
- `vlpipe.objectives.lm`: next-token LM loss with token / sample / square averaging, packing-aware.
- `vlpipe.objectives.mpo`: mixed preference optimisation (DPO + BCO with a running reward shift + SFT).
- `vlpipe.objectives.prm`: VisualPRM-style process reward model: conversation format, step scores, aggregation.
- `vlpipe.objectives.distributed`: the data-parallel sum the losses need.

This package imports nothing eagerly, so `import vlpipe.objectives.config` stays torch-free.
"""
