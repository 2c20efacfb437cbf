"""The critic: more SFT from the policy's SFT checkpoint, the PRM's base (trained by the SFT stage's flow)."""
