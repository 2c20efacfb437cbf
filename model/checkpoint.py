"""Hugging Face-format checkpoints: model, tokenizer, processor config and vlpipe's own settings.

A checkpoint directory loads with `InternVLForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained`, so transformers, vLLM and LMDeploy users take the weights as they are.
vlpipe's extra settings (preset, V2PE δ at inference, template) live in `config.json` (the V2PE δ as
`v2pe_delta`) and in `vlpipe.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from vlpipe.model.build import V2PE_CONFIG_KEY
from vlpipe.model.image import ImageProcessingConfig
from vlpipe.model.storage import is_remote, localize, upload_dir
from vlpipe.model.tokenizer import add_internvl_tokens

VLPIPE_FILE = "vlpipe.json"


@dataclass
class LoadedModel:
    """A checkpoint in memory, with everything inference needs to process inputs as in training."""

    model: InternVLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_cfg: ImageProcessingConfig
    v2pe_delta: float
    tokens_per_tile: int
    path: str
    metadata: dict = field(default_factory=dict)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)


def save_checkpoint(
    out: str | Path,
    model: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image_cfg: ImageProcessingConfig,
    *,
    metadata: dict | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write a complete HF checkpoint atomically (write to a temporary directory, then rename).

    Args:
        out: destination directory, local or `s3://` (uploaded after the local write).
        model: the model; its config carries `v2pe_delta`.
        tokenizer: the tokenizer (with InternVL's tokens and the chat template).
        image_cfg: tiling/normalisation settings, written as the HF image processor config.
        metadata: extra JSON-serialisable facts (preset, stage, resolved config) for `vlpipe.json`.
        storage_options: fsspec options for a remote destination.

    Returns:
        `out` as a string.
    """
    out = str(out)
    local_target = Path(tempfile.mkdtemp(prefix="vlpipe-ckpt-")) / "ckpt" if is_remote(out) else Path(out)
    local_target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local_target.parent, prefix=f".{local_target.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        image_cfg.to_hf_image_processor().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # What InternVLProcessor.save_pretrained writes; building the processor itself needs torchvision (for
        # its video processor), which a CPU install does not have.
        processor_cfg = {
            "processor_class": "InternVLProcessor",
            "image_seq_length": int(model.config.image_seq_length),
        }
        (tmp / "processor_config.json").write_text(json.dumps(processor_cfg, indent=2) + "\n")
        info = {"format": 1, "v2pe_delta": getattr(model.config, V2PE_CONFIG_KEY, 1.0), **(metadata or {})}
        (tmp / VLPIPE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        if local_target.exists():
            old = local_target.with_name(f".{local_target.name}.old-{os.getpid()}")
            local_target.rename(old)
            tmp.rename(local_target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(local_target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if is_remote(out):
        upload_dir(local_target, out, storage_options=storage_options)
        shutil.rmtree(local_target.parent, ignore_errors=True)
    return out


def load_checkpoint(
    uri: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
) -> LoadedModel:
    """Load a checkpoint from a local path or `s3://` URL.

    Raises:
        FileNotFoundError: when the path does not exist or is not a checkpoint.
    """
    path = localize(str(uri), storage_options=storage_options)
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{uri} has no config.json; point at a directory written by vlpipe or HF")
    model = (
        InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    )
    tokenizer = add_internvl_tokens(AutoTokenizer.from_pretrained(path))
    image_cfg = ImageProcessingConfig.from_pretrained(path)
    meta_path = Path(path) / VLPIPE_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_cfg=image_cfg,
        v2pe_delta=float(getattr(model.config, V2PE_CONFIG_KEY, 1.0)),
        tokens_per_tile=int(model.config.image_seq_length),
        path=path,
        metadata=metadata,
    )
