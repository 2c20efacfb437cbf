"""vlpipe: model."""
