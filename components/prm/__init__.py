"""PRM training: a VisualPRM-style process reward model trained by SFT on `+`/`-` step judgements."""
