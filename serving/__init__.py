"""vlpipe: serving."""
