"""The data steps of the pipeline: prepare (demo data or existing files), init (starting model), mix."""
