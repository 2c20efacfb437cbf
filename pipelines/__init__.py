"""vlpipe: pipelines."""
