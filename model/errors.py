"""Errors that separate a user's mistake (bad data, bad config: do not retry) from infrastructure failures."""

from __future__ import annotations


class SampleError(ValueError):
    """One sample cannot be used. Carries a machine-readable `reason` so skips can be counted.

    Args:
        sample: the sample's id, file or line (named in the message).
        reason: a short reason code, e.g. `missing_image`, `corrupt_image`, `image_count_mismatch`, `too_long`.
        detail: what is wrong and what to do about it.
    """

    def __init__(self, sample: str, reason: str, detail: str) -> None:
        self.sample = sample
        self.reason = reason
        self.detail = detail
        super().__init__(f"{sample}: {reason}: {detail}")
