"""The shipped recipes (YAML files validated by `vlpipe.pipelines.config.PipelineConfig`); a package so that
installs without the source tree (the release image) carry them as package data."""
