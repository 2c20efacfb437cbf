"""The shape of an InternVL conversation record, checked before anything uses it (no torch: recipes and
meta-file checks import this on any machine)."""

from __future__ import annotations

from vlpipe.model.errors import SampleError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""Turn roles as written in data → ChatML roles."""


def image_list(record: dict) -> list[str]:
    """The record's image paths as a list ([] for pure text).

    Raises:
        SampleError: `malformed` when "image" is neither a path nor a list of paths.
    """
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(i, str) and i for i in image):
        return list(image)
    raise SampleError(
        str(record.get("id", "<no id>")),
        "malformed",
        f'key "image" must be a path or a list of paths, got {describe(image)}',
    )


def describe(value: object) -> str:
    """A short, safe description of a wrong value for an error message (type and a clipped repr)."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_record(record: object, sample_id: str) -> dict:
    """Check a conversation record's shape before anything uses it.

    Returns:
        the record (a dict).

    Raises:
        SampleError: `malformed`, naming the key that is wrong and what it must be.
    """
    if not isinstance(record, dict):
        raise SampleError(sample_id, "malformed", f"a record must be a JSON object, got {describe(record)}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError(sample_id, "malformed", 'key "conversations" must be a non-empty list of turns')
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError(sample_id, "malformed", f"conversations[{i}] must be an object with from/value")
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or role not in ROLES:
            raise SampleError(
                sample_id,
                "malformed",
                f"conversations[{i}].from must be one of {sorted(ROLES)}, got {describe(role)}",
            )
        if not isinstance(value, str):
            raise SampleError(
                sample_id, "malformed", f"conversations[{i}].value must be a string, got {describe(value)}"
            )
    if "id" in record and not isinstance(record["id"], str | int):
        raise SampleError(
            sample_id, "malformed", f'key "id" must be a string or integer, got {describe(record["id"])}'
        )
    images = image_list({**record, "id": sample_id})
    video = record.get("video")
    if video is not None and video != "":
        if not isinstance(video, str):
            raise SampleError(sample_id, "malformed", f'key "video" must be a path, got {describe(video)}')
        if images:
            raise SampleError(sample_id, "malformed", 'a record has "image" or "video", not both')
    return record


def video_of(record: dict) -> str | None:
    """The record's video path (a file or a frame folder), or None."""
    video = record.get("video")
    return video if isinstance(video, str) and video and not record.get("image") else None
