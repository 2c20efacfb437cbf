"""On-policy PRM data: N sampled solutions per source item from the policy, every reasoning step labelled."""
