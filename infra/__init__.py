"""vlpipe: infra."""
