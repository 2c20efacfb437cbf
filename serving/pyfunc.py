"""An MLflow pyfunc model that serves a vlpipe checkpoint: image + prompt in, answer out.

MLflow's transformers flavour has no pyfunc for processor-based (multimodal) models, so final checkpoints are
logged as a `VLPipePyfunc`: the checkpoint directory travels as the model's artifact `checkpoint`, and
`predict` processes each row exactly as training does (`vlpipe.model.image` tiling, the ChatML template of
`vlpipe.model.conversation`, V2PE with the checkpoint's δ) before `vlpipe.model.generate.generate`.

Input rows (a pandas DataFrame, or a list of dicts when called directly) have a `prompt` (string, required)
and an optional `image`: the encoded image file (PNG, JPEG, ...) as base64, or a data URL
`data:image/png;base64,...`. Params: `max_new_tokens` (64), `temperature` (0 = greedy), `top_p` (1.0),
`seed` (None). The output is one answer string per row.

The model is pickled *by reference* to `vlpipe.serving.pyfunc.VLPipePyfunc`, so the serving environment needs vlpipe
installed (the serving image has it); the logged pip requirements pin only the numerical stack.

    with mlflow.start_run():
        info = log_checkpoint_model("s3://models/internvl3-2b/sft", registered_model_name="internvl3-2b")
    model = mlflow.pyfunc.load_model(info.model_uri)
    model.predict(pd.DataFrame([{"prompt": "Describe the image.", "image": b64_png}]), params={"seed": 0})
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.version import Version

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from vlpipe.model.checkpoint import LoadedModel
    from vlpipe.model.conversation import ConversationEncoder, EncodedSample

CHECKPOINT_ARTIFACT = "checkpoint"
IMAGE_PLACEHOLDER = (
    "<image>"  # the same literal as vlpipe.model.conversation.IMAGE_PLACEHOLDER (kept import-light)
)
# Distributions whose installed versions are pinned in the logged model; vlpipe itself comes with the image.
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "pillow", "numpy")
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": None}
# Logged with the model: MLflow only lets `load_model(..., model_config=...)` override keys logged here.
DEFAULT_MODEL_CONFIG: dict[str, Any] = {"device": "auto", "dtype": "auto", "max_pixels": None}
# The highest sampling temperature served (OpenAI's bound); the lowest is vlpipe.model.generate.MIN_TEMPERATURE.
MAX_TEMPERATURE = 2.0

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False)]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
            ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
            ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
            ParamSpec("seed", "long", DEFAULT_PARAMS["seed"]),
        ]
    ),
)


class VLPipePyfunc(mlflow.pyfunc.PythonModel):
    """Generates answers from a vlpipe checkpoint for rows of `prompt` + optional base64 `image`.

    `load_context` reads the checkpoint from the artifact `checkpoint`. Its `model_config` (see
    `DEFAULT_MODEL_CONFIG`; override with `mlflow.pyfunc.load_model(uri, model_config={...})`) has `device`
    (`auto`: `cuda` when available, else `cpu`), `dtype` (a torch dtype name; `auto`: `bfloat16` on a GPU
    that supports it, else `float32`) and `max_pixels` (largest accepted width·height of an input image;
    None: the checkpoint image config's cap).
    """

    def __init__(self) -> None:
        self.loaded: LoadedModel | None = None
        self.encoder: ConversationEncoder | None = None
        self.eos_token_id: int | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the checkpoint artifact onto the configured device and build the prompt encoder.

        Raises:
            ValueError: for an unknown `dtype` or a non-positive `max_pixels` in `model_config`.
            FileNotFoundError: when the artifact is not a checkpoint.
        """
        # Imported here, not at module level, so that importing vlpipe.serving.pyfunc stays cheap.
        import torch

        from vlpipe.model.checkpoint import load_checkpoint
        from vlpipe.model.conversation import ConversationEncoder
        from vlpipe.model.tokenizer import IM_END

        config = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        device = config["device"]
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = config["dtype"]
        if dtype_name in (None, "auto"):
            cuda = str(device).startswith("cuda")
            dtype_name = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        dtype = getattr(torch, str(dtype_name), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"model_config dtype {dtype_name!r} is not a torch dtype; use e.g. 'bfloat16'")
        loaded = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], dtype=dtype, device=device)
        if config.get("max_pixels") is not None:
            max_pixels = int(config["max_pixels"])
            if max_pixels <= 0:
                raise ValueError(f"model_config max_pixels must be positive, got {max_pixels}")
            loaded.image_cfg = loaded.image_cfg.model_copy(update={"max_pixels": max_pixels})
        self.loaded = loaded
        self.encoder = ConversationEncoder(
            loaded.tokenizer,
            loaded.tokens_per_tile,
            max_length=int(loaded.model.config.text_config.max_position_embeddings),
            mode="sft",
        )
        self.eos_token_id = int(loaded.tokenizer.convert_tokens_to_ids(IM_END))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        """Answer every row (all rows are generated as one left-padded batch).

        Args:
            context: MLflow's context (unused; the model is loaded in `load_context`).
            model_input: a DataFrame (or a list of dicts) with `prompt` and optional `image` columns.
            params: `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `seed`; missing ones take the
                defaults of `SIGNATURE`.

        Returns:
            One decoded answer per row, in row order, without special tokens.

        Raises:
            ValueError: for a bad row (named by its 0-based position, with what to fix) or a bad parameter.
                Every row is checked before anything is generated.
            RuntimeError: when called before `load_context`.
        """
        from vlpipe.model.generate import generate

        self._check_loaded()
        assert self.loaded is not None and self.eos_token_id is not None
        settings = generation_settings(params)
        prompts = self.encode(model_input)
        if not prompts:
            return []
        tokenizer = self.loaded.tokenizer
        answers = generate(
            self.loaded.model,
            prompts,
            eos_token_id=self.eos_token_id,
            pad_token_id=int(tokenizer.pad_token_id),
            max_new_tokens=settings["max_new_tokens"],
            do_sample=settings["temperature"] > 0,
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            seed=settings["seed"],
        )
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]

    def encode(self, model_input: pd.DataFrame | list[dict[str, Any]]) -> list[EncodedSample]:
        """The generation prompts `predict` feeds the model: ids, V2PE positions and tiles of every row.

        Raises:
            ValueError: for a bad row, named by its index, with what to fix.
            RuntimeError: when called before `load_context`.
        """
        self._check_loaded()
        return [self._encode_row(i, row) for i, row in enumerate(_rows(model_input))]

    def _check_loaded(self) -> None:
        if self.loaded is None or self.encoder is None or self.eos_token_id is None:
            raise RuntimeError("VLPipePyfunc used before load_context; load it with mlflow.pyfunc.load_model")

    def _encode_row(self, index: int, row: dict[str, Any]) -> EncodedSample:
        """One row → an encoded generation prompt with its tiles, exactly as in training."""
        from vlpipe.model.image import decode_image
        from vlpipe.model.prompt import generation_prompt

        assert self.loaded is not None and self.encoder is not None
        name = f"row {index}"
        prompt = row.get("prompt")
        if _is_missing(prompt) or not isinstance(prompt, str):
            shown = "missing" if _is_missing(prompt) else f"{type(prompt).__name__}, not a string"
            raise ValueError(f"{name}: 'prompt' is {shown}; give every row a non-empty string prompt")
        image_value = row.get("image")
        images = []
        if not _is_missing(image_value):
            data = decode_image_field(image_value, name)
            # decode_image raises SampleError (a ValueError) naming the row: corrupt_image or image_too_large.
            images = [decode_image(data, source=name, max_pixels=self.loaded.image_cfg.max_pixels)]
            if IMAGE_PLACEHOLDER not in prompt:
                prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        return generation_prompt(self.encoder, self.loaded, [("human", prompt)], images, sample_id=name)


def _is_missing(value: Any) -> bool:
    """None, NaN or pd.NA (pandas' missing values) or a blank string."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _rows(model_input: pd.DataFrame | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(
                f"input has no 'prompt' column (columns: {list(model_input.columns)}); "
                "send rows with a 'prompt' string and an optional base64 'image'"
            )
        return model_input.to_dict(orient="records")
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise ValueError(
        f"expected a DataFrame or a list of dicts with 'prompt' and optional 'image', got {type(model_input)}"
    )


def decode_image_field(value: Any, name: str) -> bytes:
    """The image file bytes of an `image` field: base64 text or a `data:<mime>;base64,` URL (raw bytes pass).

    Args:
        value: the field's value.
        name: the row's name for error messages, e.g. `row 3`.

    Raises:
        ValueError: naming the row, when the value is not base64 or is an unsupported data URL.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}: 'image' must be a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ValueError(
                f"{name}: 'image' data URL must be base64-encoded, like 'data:image/png;base64,iVBOR...'"
            )
        if not header[5:].lower().startswith("image/"):
            raise ValueError(
                f"{name}: 'image' data URL must have an image media type, like 'data:image/png;base64,...'"
            )
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{name}: 'image' is not valid base64; send the image file's bytes base64-encoded "
            "or as a data URL 'data:image/png;base64,...'"
        ) from None
    if not data:
        raise ValueError(f"{name}: 'image' decodes to no bytes; send the encoded image file")
    return data


def _integer(name: str, value: Any) -> int:
    # bool is an int subclass, and a float or string is never silently truncated or parsed.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer (a JSON number without a fraction), not a {_kind(value)}"
        )
    return int(value)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, not a {_kind(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number")
    return number


def _kind(value: Any) -> str:
    return {bool: "boolean", str: "string", float: "fractional number"}.get(type(value), type(value).__name__)


def generation_settings(params: dict[str, Any] | None) -> dict[str, Any]:
    """Validated generation settings: `params` over `DEFAULT_PARAMS` (None means the default).

    Types are strict: `max_new_tokens` and `seed` are integers (not `1.9`, `"5"` or `true`), `temperature`
    and `top_p` finite numbers. Ranges: `max_new_tokens` >= 1; `temperature` 0 (greedy) or within
    [`MIN_TEMPERATURE`, `MAX_TEMPERATURE`]; `top_p` in (0, 1]; `seed` within [`SEED_MIN`, `SEED_MAX`].
    Messages name the parameter and the rule, never the value sent.

    Raises:
        ValueError: for an unknown name, a wrong type or an out-of-range value.
    """
    from vlpipe.model.generate import MIN_TEMPERATURE, SEED_MAX, SEED_MIN

    params = dict(params or {})
    unknown = [k for k in params if k not in DEFAULT_PARAMS]
    if unknown:
        raise ValueError(f"unknown params ({len(unknown)}); supported: {sorted(DEFAULT_PARAMS)}")
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    settings = {
        "max_new_tokens": _integer("max_new_tokens", merged["max_new_tokens"]),
        "temperature": _finite("temperature", merged["temperature"]),
        "top_p": _finite("top_p", merged["top_p"]),
        "seed": None if merged["seed"] is None else _integer("seed", merged["seed"]),
    }
    if settings["max_new_tokens"] < 1:
        raise ValueError("max_new_tokens must be at least 1")
    temperature = settings["temperature"]
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
    if not 0 < settings["top_p"] <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if settings["seed"] is not None and not SEED_MIN <= settings["seed"] <= SEED_MAX:
        raise ValueError(f"seed must be an integer from {SEED_MIN} to {SEED_MAX} (64 bits)")
    return settings


def input_example() -> tuple[pd.DataFrame, dict[str, Any]]:
    """A two-row example (a base64 PNG with a question, and a text-only prompt) with short generation.

    MLflow stores it with the model and runs it once through the loaded model when logging.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    frame = pd.DataFrame(
        [
            {"prompt": "How many red shapes are there?", "image": image},
            {"prompt": "Count from one to three.", "image": None},
        ]
    )
    return frame, {"max_new_tokens": 8}


def pip_requirements() -> list[str]:
    """Pins of the installed serving stack (`SERVING_PACKAGES`), public versions (`2.13.0`, not `+cpu`).

    The local version label is dropped so the GPU serving image resolves its own torch build.
    """
    return [f"{name}=={Version(version(name)).public}" for name in SERVING_PACKAGES]


def log_checkpoint_model(
    checkpoint_dir: str,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    metadata: dict | None = None,
) -> ModelInfo:
    """Log a vlpipe checkpoint as a `VLPipePyfunc` model in the active MLflow run.

    The checkpoint directory becomes the model's artifact `checkpoint`. The pip requirements are explicit
    (`pip_requirements()`: torch, transformers, tokenizers, pillow, numpy at their installed versions), so
    MLflow infers nothing and touches no network. vlpipe itself is not a requirement (it is not on PyPI): the
    model is pickled by reference to `vlpipe.serving.pyfunc.VLPipePyfunc`, and the serving image has vlpipe
    installed. MLflow loads the logged model once to check the input example (a short generation).

    Args:
        checkpoint_dir: a checkpoint written by `vlpipe.model.checkpoint.save_checkpoint`, local or `s3://`
            (downloaded into the vlpipe cache first).
        name: the logged model's name within the run.
        registered_model_name: also register the model under this name (creating a new version).
        metadata: extra facts stored in the MLmodel file, on top of the checkpoint's source, preset, stage
            and V2PE δ.

    Returns:
        MLflow's `ModelInfo` (`model_uri` loads it with `mlflow.pyfunc.load_model`).

    Raises:
        RuntimeError: when no MLflow run is active.
        FileNotFoundError: when `checkpoint_dir` does not exist or has no `config.json`.
    """
    from vlpipe.model.storage import localize

    if mlflow.active_run() is None:
        raise RuntimeError("log_checkpoint_model logs into the active run; call it inside mlflow.start_run()")
    local = Path(localize(checkpoint_dir))
    if not (local / "config.json").exists():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no config.json; point at a directory written by vlpipe's save_checkpoint"
        )
    info_path = local / "vlpipe.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    model_metadata = {
        "vlpipe_checkpoint": checkpoint_dir,
        **{k: info[k] for k in ("preset", "stage", "v2pe_delta") if k in info},
        **(metadata or {}),
    }
    with _quiet_logging():
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=VLPipePyfunc(),
            artifacts={CHECKPOINT_ARTIFACT: str(local)},
            signature=SIGNATURE,
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            metadata=model_metadata,
            model_config=dict(DEFAULT_MODEL_CONFIG),
        )


class _DropCloudPickleNotice(logging.Filter):
    # MLflow warns on every instance-based python_model; pickling by reference is the deliberate choice here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "serialized using CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Within the block: no artifact/weight progress bars and no CloudPickle notice; restored after."""
    from transformers.utils import logging as hf_logging

    env_key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous_env = os.environ.get(env_key)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    notice_filter = _DropCloudPickleNotice()
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    os.environ[env_key] = "false"
    hf_logging.disable_progress_bar()
    pyfunc_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        pyfunc_logger.removeFilter(notice_filter)
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if previous_env is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = previous_env
