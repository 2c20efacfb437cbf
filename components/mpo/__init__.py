"""MPO: mixed preference optimisation (DPO + BCO + LM loss) against a frozen reference policy."""
