"""The register step: the trained policy into the MLflow model registry, with lineage and an alias."""
