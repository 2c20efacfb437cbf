"""OpenAI-compatible chat completions (`POST /openai/v1/chat/completions`) on KServe's FastAPI app.

KServe 0.21's own OpenAI model classes import vLLM, so without vLLM their routes are never registered; this
module adds the route itself (`register_openai_routes`) with pydantic request/response models. A request
carries OpenAI chat messages whose content is a string or a list of `text`, `image_url` and (vLLM's extension)
`video_url` parts; images must be base64 data URLs with an image media type (`data:image/png;base64,...`),
a video a `data:video/...;base64,` URL — remote `http(s)` URLs are refused, the server never fetches anything.
A video is decoded with PyAV and sampled as evaluation samples one (`ServingLimits.max_video_frames` frames,
each the middle of an equal segment, one tile each, `Frame{i}: <image>` lines); a request holds at most one
video, in its first user message, and no images; a video over `max_video_bytes` is refused with 413. Messages map to InternVL conversation turns (system/developer → system,
user → human, assistant → gpt); each image part becomes an `<image>` placeholder at its place in the user turn
(parts are joined by newlines, so `[image, text]` gives InternVL's `<image>\\n...`). Supported fields:
`model`, `messages`, `max_tokens` (or `max_completion_tokens`), `temperature` (default 1.0, as OpenAI;
0 = greedy), `top_p`, `n`, `seed`, `stream` (server-sent events ending with `data: [DONE]`), and the extension
`best_of`: sample that many answers at the request's temperature and return the `n` the process reward model
scores highest, best first, each with its `prm_score` (at temperature 0 every sample is the greedy answer).
Unknown fields are ignored, as OpenAI clients send many optional ones; known ones are strictly typed (`"5"` is
not 5, `"yes"` not true, `1.9` not an integer), `temperature` is 0 or 0.001–2 and `seed` a 64-bit integer (422
otherwise).

Streaming sends each token's text as a chunk as soon as the batcher produces it (`ChatModel.chat_stream`): a
role chunk per choice, content chunks by choice index as the rows advance (interleaved when `n` > 1), a chunk
with the finish reason when a row ends, then `data: [DONE]`. The chunks join to the non-streamed answer. A
client that disconnects cancels its rows. With `best_of` the PRM needs whole answers, so those stream only after
scoring. Past the request timeout a started stream ends with an error event (`{"error": {..., "code": 504}}`).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlpipe.serving.limits import RequestRejected, ServingLimits, error_body
from vlpipe.serving.pyfunc import MAX_TEMPERATURE, decode_image_field

# vlpipe.model.generate's bounds, repeated so that importing this module does not import torch
# (tests/serving/test_openai.py checks that they agree).
MIN_TEMPERATURE = 1e-3
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

if TYPE_CHECKING:
    from fastapi import FastAPI
    from kserve.model_repository import ModelRepository

OPENAI_ROUTE_PREFIX = "/openai/v1"
_ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}


# -- request ------------------------------------------------------------------------------------------------
class ImageURL(BaseModel):
    """An image given as a URL; only `data:image/...;base64,` URLs are accepted."""

    model_config = ConfigDict(extra="ignore", strict=True)

    url: str
    detail: str | None = None


class TextPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image part of a message's content (`image_url` as an object, or as the URL string itself)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["image_url"]
    image_url: ImageURL | str


class VideoURL(BaseModel):
    """A video given as a URL; only `data:video/...;base64,` URLs are accepted."""

    model_config = ConfigDict(extra="ignore", strict=True)

    url: str


class VideoPart(BaseModel):
    """A video part of a message's content, as vLLM's chat API takes it (`{"type": "video_url", "video_url":
    {"url": "data:video/mp4;base64,..."}}`, or the URL string itself)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["video_url"]
    video_url: VideoURL | str


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    """The body of `POST /openai/v1/chat/completions`. Types are strict (no `"5"` for 5, no `"yes"` for
    true, no `1.9` for an integer), numbers finite; static ranges fail with 422; the server's caps
    (`ServingLimits`) are checked by the route and fail with 400."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, value: float) -> float:
        # Below MIN_TEMPERATURE the logits divided by it overflow (NaN probabilities) inside generation.
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value


# -- response -----------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    """The answer of one choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    """One answer; `prm_score` is set when the answer was chosen by `best_of`."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    prm_score: float | None = None


class Usage(BaseModel):
    """Token counts of a request (completion tokens over every sampled answer, `best_of` included)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    """A non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    """The part of an answer a chunk adds."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    """One choice's piece within a streamed chunk."""

    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    prm_score: float | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]


# -- what the route hands the model, and what it gets back -----------------------------------------------------
@dataclass(frozen=True)
class Conversation:
    """A chat request as InternVL turns: (`system`|`human`|`gpt`, text with `<image>` placeholders), and the
    encoded image files in placeholder order."""

    turns: tuple[tuple[str, str], ...]
    images: tuple[bytes, ...] = ()
    video: bytes | None = None  # the encoded video file; its turn holds a `<video>` placeholder


@dataclass(frozen=True)
class ChatSettings:
    """Generation settings of a chat request, already checked against the caps."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    best_of: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text, token ids (without the end token) and why it stopped."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prm_score: float | None = None


@dataclass(frozen=True)
class ChatResult:
    """The chosen answers of a chat request and its token counts."""

    completions: list[Completion]
    prompt_tokens: int
    completion_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


class ChatModel(Protocol):
    """What the route needs of a served model (`vlpipe.serving.predictor.VLPipeModel` is one)."""

    name: str
    ready: bool
    limits: ServingLimits

    async def chat(self, conversation: Conversation, settings: ChatSettings) -> ChatResult: ...

    async def chat_stream(self, conversation: Conversation, settings: ChatSettings) -> TokenStream: ...

    def text_pieces(self, token_ids: Sequence[int]) -> list[str]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class StreamUpdate(Protocol):
    """One row's progress in a step: a new token, and/or its finish reason when it ended."""

    index: int
    token: int | None
    finish_reason: str | None


class TokenStream(Protocol):
    """A chat answer being generated (`vlpipe.serving.predictor.ChatStream` is one)."""

    size: int
    prompt_tokens: int

    async def next(self) -> Sequence[StreamUpdate] | None: ...

    def cancel(self) -> None: ...


class IncrementalText:
    """A row's text as its tokens arrive, cut as `text_pieces` cuts it: a piece is sent once the decoded
    prefix is stable (not ending in a partial UTF-8 character), the rest when the row ends.

    Args:
        decode: token ids → text (the model's, without special tokens).
    """

    def __init__(self, decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        """The new text `token` completes ("" while it is incomplete)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.startswith(self.sent) and not text.endswith("\ufffd") and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            return piece
        return ""

    def finish(self) -> str:
        """What is left to send once the row has ended."""
        text = self.decode(self.ids)
        rest = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return rest


# -- request → conversation --------------------------------------------------------------------------------
def _image_count(request: ChatCompletionRequest) -> int:
    return sum(
        isinstance(part, ImagePart)
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
    )


def _image_bytes(part: ImagePart, where: str) -> bytes:
    url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
    scheme = url.strip()[:8].lower()
    if scheme.startswith(("http://", "https://")):
        raise RequestRejected(
            400,
            f"{where}: remote image URLs are not fetched by this server; send the image inline as a base64 "
            "data URL, 'data:image/png;base64,...'",
            param=where,
        )
    if not scheme.startswith("data:"):
        raise RequestRejected(
            400, f"{where}: image_url must be a base64 data URL, 'data:image/png;base64,...'", param=where
        )
    try:
        return decode_image_field(url, where)
    except ValueError as exc:
        raise RequestRejected(400, str(exc), param=where) from exc


def _video_bytes(part: VideoPart, where: str, limits: ServingLimits) -> bytes:
    url = part.video_url.url if isinstance(part.video_url, VideoURL) else part.video_url
    text = url.strip()
    if text[:8].lower().startswith(("http://", "https://")):
        raise RequestRejected(
            400,
            f"{where}: remote video URLs are not fetched by this server; send the video inline as a base64 "
            "data URL, 'data:video/mp4;base64,...'",
            param=where,
        )
    header, comma, payload = text.partition(",")
    if not (comma and header[:11].lower() == "data:video/" and header.lower().endswith(";base64")):
        raise RequestRejected(
            400, f"{where}: video_url must be a base64 data URL, 'data:video/mp4;base64,...'", param=where
        )
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 - payload[-2:].count("=") > limits.max_video_bytes:  # before decoding
        raise RequestRejected(
            413,
            f"{where}: the video is larger than the server's max_video_bytes of {limits.max_video_bytes} bytes; "
            "send a shorter or smaller video",
            param=where,
            code="video_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected(400, f"{where}: the video data URL is not valid base64", param=where) from None


def to_conversation(request: ChatCompletionRequest, limits: ServingLimits) -> Conversation:
    """Map OpenAI messages to InternVL turns and decode their base64 images (not yet the image files).

    Args:
        request: the validated request.
        limits: the caps on messages and images.

    Returns:
        The conversation; its last turn is a human turn.

    Raises:
        RequestRejected: (400) too many messages or images, a remote or malformed image URL, invalid base64,
            an image outside a user message, or a conversation that does not end with a user message.
    """
    if len(request.messages) > limits.max_messages:
        raise RequestRejected(
            400,
            f"{len(request.messages)} messages, above the server's cap of {limits.max_messages}",
            param="messages",
        )
    count = _image_count(request)
    first_user = next((i for i, m in enumerate(request.messages) if m.role == "user"), -1)
    if count > limits.max_images:
        raise RequestRejected(
            400,
            f"{count} images in the request, above the server's cap of {limits.max_images}; send fewer images",
            param="messages",
        )
    turns: list[tuple[str, str]] = []
    images: list[bytes] = []
    video: bytes | None = None
    for i, message in enumerate(request.messages):
        content = message.content
        if content is None or isinstance(content, str):
            turns.append((_ROLES[message.role], content or ""))
            continue
        pieces: list[str] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                pieces.append(part.text)
                continue
            where = f"messages[{i}].content[{j}]"
            if message.role != "user":
                raise RequestRejected(
                    400,
                    f"{where}: {'videos' if isinstance(part, VideoPart) else 'images'} belong in user messages, "
                    f"not {message.role}",
                    param=where,
                )
            if isinstance(part, VideoPart):
                if video is not None or count or i != first_user:
                    raise RequestRejected(
                        400,
                        f"{where}: a request holds at most one video, in its first user message, and no images "
                        "(InternVL's video format)",
                        param=where,
                    )
                video = _video_bytes(part, where, limits)
                pieces.append("<video>")
                continue
            images.append(_image_bytes(part, where))
            pieces.append("<image>")
        turns.append((_ROLES[message.role], "\n".join(pieces)))
    if turns[-1][0] != "human":
        raise RequestRejected(
            400,
            f"the last message is a {request.messages[-1].role} message; end the conversation with a user "
            "message to get an answer",
            param="messages",
        )
    return Conversation(tuple(turns), tuple(images), video)


def chat_settings(request: ChatCompletionRequest, limits: ServingLimits) -> ChatSettings:
    """The request's generation settings, checked against the server's caps.

    Raises:
        RequestRejected: (400) `max_tokens`, `n` or `best_of` above their caps, or `best_of` below `n`.
    """
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestRejected(
            400, f"max_tokens {max_tokens} is above the server's cap of {limits.max_tokens}", "max_tokens"
        )
    if request.n > limits.max_n:
        raise RequestRejected(400, f"n {request.n} is above the server's cap of {limits.max_n}", "n")
    if request.best_of is not None:
        if request.best_of > limits.max_best_of:
            raise RequestRejected(
                400, f"best_of {request.best_of} is above the server's cap of {limits.max_best_of}", "best_of"
            )
        if request.best_of < request.n:
            raise RequestRejected(
                400, f"best_of ({request.best_of}) must be at least n ({request.n})", "best_of"
            )
    return ChatSettings(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        n=request.n,
        best_of=request.best_of,
        seed=request.seed,
    )


# -- responses -----------------------------------------------------------------------------------------------
def completion_response(model_name: str, result: ChatResult, *, response_id: str, created: int) -> dict:
    """The JSON body of a non-streamed completion (`prm_score` only on `best_of` answers)."""
    response = ChatCompletionResponse(
        id=response_id,
        created=created,
        model=model_name,
        choices=[
            ChatCompletionChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,
                prm_score=c.prm_score,
            )
            for i, c in enumerate(result.completions)
        ],
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )
    return response.model_dump(mode="json", exclude_none=True)


def _sse(chunk: ChatCompletionChunk) -> str:
    data = chunk.model_dump(mode="json")
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if choice["prm_score"] is None:
            del choice["prm_score"]
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_events(
    model: ChatModel, result: ChatResult, *, response_id: str, created: int
) -> AsyncIterator[str]:
    """Server-sent events of a completion: per choice a role chunk, one chunk per decoded token piece and a
    chunk with the finish reason; then `data: [DONE]`."""

    def chunk(index: int, delta: ChoiceDelta, finish: FinishReason | None = None, score=None) -> str:
        choice = ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish, prm_score=score)
        return _sse(ChatCompletionChunk(id=response_id, created=created, model=model.name, choices=[choice]))

    for i, completion in enumerate(result.completions):
        yield chunk(i, ChoiceDelta(role="assistant", content=""))
        for piece in model.text_pieces(completion.token_ids):
            yield chunk(i, ChoiceDelta(content=piece))
        yield chunk(i, ChoiceDelta(), completion.finish_reason, completion.prm_score)
    yield "data: [DONE]\n\n"


async def live_events(
    model: ChatModel,
    stream: TokenStream,
    first: Sequence[StreamUpdate] | None,
    *,
    response_id: str,
    created: int,
) -> AsyncIterator[str]:
    """Server-sent events of a chat answer as it is generated (see the module docstring). Closing the
    iterator early (the client disconnected) cancels the rows."""

    def chunk(index: int, delta: ChoiceDelta, finish: FinishReason | None = None) -> str:
        choice = ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish)
        return _sse(ChatCompletionChunk(id=response_id, created=created, model=model.name, choices=[choice]))

    texts = [IncrementalText(model.decode) for _ in range(stream.size)]
    try:
        for i in range(stream.size):
            yield chunk(i, ChoiceDelta(role="assistant", content=""))
        updates = first
        while updates is not None:
            for u in updates:
                piece = texts[u.index].push(u.token) if u.token is not None else ""
                if u.finish_reason is not None:
                    piece += texts[u.index].finish()
                if piece:
                    yield chunk(u.index, ChoiceDelta(content=piece))
                if u.finish_reason is not None:
                    finish: FinishReason = "length" if u.finish_reason == "length" else "stop"
                    yield chunk(u.index, ChoiceDelta(), finish)
            try:
                updates = await stream.next()
            except RequestRejected as exc:  # the deadline passed mid-stream: the status has been sent
                body = error_body(OPENAI_ROUTE_PREFIX + "/", exc.status_code, exc.message)
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # a no-op once every row has finished; frees the rows of a client that left


# -- routes ------------------------------------------------------------------------------------------------
def _find_model(registry: ModelRepository, name: str | None) -> ChatModel:
    models = registry.get_models()
    if name is None:
        if len(models) != 1:
            raise RequestRejected(400, f"name the model: one of {sorted(models)}", param="model")
        name = next(iter(models))
    model = registry.get_model(name)
    if model is None:
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise RequestRejected(
            404,
            f"model {shown!r} is not served here; available: {sorted(models)}",
            param="model",
            code="model_not_found",
        )
    if not hasattr(model, "chat"):
        raise RequestRejected(400, f"model {name!r} does not support chat completions", param="model")
    if not model.ready:
        raise RequestRejected(503, f"model {name!r} is not ready yet; retry shortly", param="model")
    return model


def register_openai_routes(app: FastAPI, registry: ModelRepository) -> None:
    """Add `POST /openai/v1/chat/completions` and `GET /openai/v1/models` to KServe's FastAPI app.

    Args:
        app: the app KServe's REST server serves (its V1/V2 routes are already on it).
        registry: KServe's model repository; requests name a model in it (or omit `model` when there is one).
    """
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse, StreamingResponse

    async def chat_completions(body: ChatCompletionRequest):
        model = _find_model(registry, body.model)
        settings = chat_settings(body, model.limits)
        conversation = to_conversation(body, model.limits)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream and settings.best_of is None:
            stream = await model.chat_stream(conversation, settings)
            try:
                first = await stream.next()  # a 504 before any token is still an HTTP status
            except BaseException:
                stream.cancel()
                raise
            return StreamingResponse(
                live_events(model, stream, first, response_id=response_id, created=created),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        result = await model.chat(conversation, settings)
        if body.stream:
            return StreamingResponse(
                stream_events(model, result, response_id=response_id, created=created),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        return JSONResponse(completion_response(model.name, result, response_id=response_id, created=created))

    async def list_models():
        names = sorted(registry.get_models())
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "vlpipe"} for n in names]}

    router = APIRouter(prefix=OPENAI_ROUTE_PREFIX, tags=["OpenAI"])
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"], response_model=None)
    router.add_api_route("/models", list_models, methods=["GET"], response_model=None)
    app.include_router(router)
