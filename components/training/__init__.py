"""What the training stages share: configs, DeepSpeed runtime, loop, checkpoints/resume, MLflow tracking."""
