"""MLflow tracking: the tracking URI, experiments, and the one run helper every stage uses."""
