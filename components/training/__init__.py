"""What the training stages share: configs, the DeepSpeed runtime and config, batch sources and the per-step
report, resumable checkpoints, the set-up and wrap-up helpers, and the Kubeflow task entry (`task.py`)."""
