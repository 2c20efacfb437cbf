"""vlpipe: components."""
