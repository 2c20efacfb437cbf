"""The pipeline's MLflow parent run: opened by the first step, closed by the exit handler."""
