"""The deploy step: the champion as a KServe InferenceService, rolled out as a canary."""
