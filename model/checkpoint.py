"""Hugging Face-format checkpoints: model, tokenizer, processor config and vlpipe's own settings.

A checkpoint directory loads with `InternVLForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained`, so transformers, vLLM and LMDeploy users take the weights as they are.
vlpipe's extra settings (preset, V2PE δ at inference, template) live in `config.json` (the V2PE δ as
`v2pe_delta`) and in `vlpipe.json`.

What every saved checkpoint has, as published InternVL3 checkpoints have it: `bos_token_id` (`<|endoftext|>`)
and `eos_token_id` (`<|im_end|>`) in `config.json` (top level and text config) and the EOS in
`generation_config.json`, so a plain `generate` stops at the end of the reply; top-level and text-config
`tie_word_embeddings` that say what the weights are; the text config's rope settings also in the legacy keys
(`rope_theta`, `rope_scaling`) that transformers 4.x reads; a tokenizer whose every id has an embedding row.
Checkpoints handed from stage to stage keep the training precision; `export_checkpoint` writes the exported
(registered, served) one in `save_dtype` (bf16 by default, as published).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from vlpipe.model.build import V2PE_CONFIG_KEY, fit_embeddings, preset_for_config
from vlpipe.model.image import ImageProcessingConfig
from vlpipe.model.storage import filesystem, is_remote, localize, upload_dir
from vlpipe.model.tokenizer import IM_END, PAD_TOKEN, PROCESSOR_TOKEN_ATTRIBUTES, add_internvl_tokens

VLPIPE_FILE = "vlpipe.json"
COMMIT_FILE = "COMMITTED"
"""The commit marker: written last into a remote checkpoint and into every resumable training checkpoint (JSON:
every file with its size, and the step of a training checkpoint). An object store has no rename, so a remote
checkpoint without it is incomplete (an upload that was cut off) and readers that need a whole one ignore it.
A local checkpoint is renamed into place complete and needs none."""
SaveDtype = Literal["bf16", "fp16", "fp32"]
SAVE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in SAVE_DTYPES.items()}


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


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """(bos, eos, pad) as published InternVL3 checkpoints have them: `<|endoftext|>`, `<|im_end|>` and the
    tokenizer's pad token (151643, 151645, 151643 with InternVL's tokenizer)."""
    vocab = tokenizer.get_vocab()
    bos, eos = vocab[PAD_TOKEN], vocab[IM_END]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    return int(bos), int(eos), int(pad)


def weights_tied(model: InternVLForConditionalGeneration) -> bool:
    """True when the LM head shares its weight with the input embeddings."""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def finalize_config(model: InternVLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set what runtimes read from `config.json` and `generation_config.json` (in place): bos/eos ids (top level
    and text config), the EOS and pad of generation, and `tie_word_embeddings` as the weights are."""
    bos, eos, pad = special_token_ids(tokenizer)
    tied = weights_tied(model)
    for config in (model.config, model.config.text_config):
        config.bos_token_id, config.eos_token_id = bos, eos
        config.tie_word_embeddings = tied
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = bos, eos, pad


def write_legacy_rope_keys(config_path: Path) -> None:
    """Also write the text config's rope settings as `rope_theta` and `rope_scaling`: transformers 5 writes only
    `rope_parameters`, and transformers 4.x (vLLM, LMDeploy, KServe's server pin their own) would then run with
    its default θ = 10000. transformers 5 reads the legacy keys too."""
    config = json.loads(config_path.read_text())
    text = config.get("text_config", {})
    text.pop("_name_or_path", None)
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        text["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# transformers 5 names its tokenizer classes differently from 4.x (which has no `TokenizersBackend`); both read
# the class names on the right (5.x keeps them as aliases).
_TOKENIZER_CLASSES_4X = {
    "TokenizersBackend": "PreTrainedTokenizerFast",
    "Qwen2Tokenizer": "Qwen2TokenizerFast",
}


def write_tokenizer_config_for_4x(config_path: Path) -> None:
    """Rewrite `tokenizer_config.json` in the form transformers 4.x reads and 5.x reads the same way: a class
    name 4.x has, `extra_special_tokens` as the mapping of named tokens (4.x fails on 5.x's list with
    `'list' object has no attribute 'keys'`) and the unnamed added special tokens as
    `additional_special_tokens`."""
    config = json.loads(config_path.read_text())
    cls = config.get("tokenizer_class")
    config["tokenizer_class"] = _TOKENIZER_CLASSES_4X.get(cls, cls)
    extra = config.get("extra_special_tokens")
    named = {k: config[k] for k in PROCESSOR_TOKEN_ATTRIBUTES if isinstance(config.get(k), str)}
    named.update(config.pop("model_specific_special_tokens", None) or {})
    if isinstance(extra, dict):
        named = {**extra, **named}
    elif isinstance(extra, list):
        config["additional_special_tokens"] = [
            t for t in extra if t not in config.get("additional_special_tokens", [])
        ]
    config["extra_special_tokens"] = named
    for key in ("is_local", "local_files_only"):  # how this process loaded it, not a property of the files
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


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
        finalize_config(model, tokenizer)
        model.save_pretrained(tmp)
        write_legacy_rope_keys(tmp / "config.json")
        image_cfg.to_hf_image_processor().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_tokenizer_config_for_4x(tmp / "tokenizer_config.json")
        # What InternVLProcessor.save_pretrained writes; building the processor itself needs torchvision (for
        # its video processor), which a CPU install does not have.
        processor_cfg = {
            "processor_class": "InternVLProcessor",
            "image_seq_length": int(model.config.image_seq_length),
        }
        (tmp / "processor_config.json").write_text(json.dumps(processor_cfg, indent=2) + "\n")
        info = {
            "format": 1,
            "v2pe_delta": getattr(model.config, V2PE_CONFIG_KEY, 1.0),
            "dtype": DTYPE_NAMES.get(model.dtype, str(model.dtype)),
            **(metadata or {}),
        }
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
        record = {"files": file_manifest(local_target)}
        remove_commit(
            out, storage_options
        )  # an overwritten checkpoint is not committed while its files change
        upload_dir(local_target, out, storage_options=storage_options)
        write_commit(out, record, storage_options)
        shutil.rmtree(local_target.parent, ignore_errors=True)
    return out


def file_manifest(directory: Path) -> dict[str, int]:
    """Relative path → size of every regular file under `directory` (what a commit marker lists)."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != COMMIT_FILE
    }


def write_commit(uri: str, record: dict[str, Any], storage_options: dict | None = None) -> None:
    """Write the commit marker of the checkpoint directory `uri` (after every file of it is in place)."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(f"{path.rstrip('/')}/{COMMIT_FILE}", "wb") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True).encode())


def remove_commit(uri: str, storage_options: dict | None = None) -> None:
    """Delete the commit marker of `uri`, if any (first, before the files it vouches for change)."""
    fs, path = filesystem(uri, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(f"{path.rstrip('/')}/{COMMIT_FILE}")


def read_commit(uri: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The commit marker of the checkpoint directory `uri`, or None when there is none (or it is not one)."""
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(f"{path.rstrip('/')}/{COMMIT_FILE}", "rb") as f:
            record = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def is_committed(uri: str, storage_options: dict | None = None) -> bool:
    """Whether `uri` holds a whole checkpoint: its commit marker exists and every file it lists is there with
    its size. A local directory without a marker counts when it has `config.json` (`save_checkpoint` renames a
    local checkpoint into place complete, and published or older checkpoints have no marker).

    This is what to ask before handing a training step's output on (the step's `Model` output, a retried
    step): a remote checkpoint whose upload was cut off is not committed.
    """
    record = read_commit(uri, storage_options)
    if record is None:
        return not is_remote(uri) and (Path(uri.removeprefix("file://")) / "config.json").is_file()
    fs, path = filesystem(uri, storage_options)
    prefix = path.rstrip("/") + "/"
    fs.invalidate_cache(path)
    try:
        found = {k[len(prefix) :]: int(v["size"]) for k, v in fs.find(prefix, detail=True).items()}
    except FileNotFoundError:
        return False
    return all(found.get(name) == size for name, size in record["files"].items())


def load_checkpoint(
    uri: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    chat_template: str | None = None,
) -> LoadedModel:
    """Load a checkpoint from a local path or `s3://` URL: a vlpipe checkpoint or a published InternVL3 one
    (transformers format).

    The tokenizer gets InternVL's tokens where missing (with new embedding rows, recorded as `added_tokens` in
    the metadata); a checkpoint without a recorded preset gets the preset its shapes match (none for a custom
    shape). The checkpoint's chat template is kept unless `chat_template` replaces it.

    Raises:
        FileNotFoundError: when the path does not exist or is not a checkpoint.
    """
    path = localize(str(uri), storage_options=storage_options)
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{uri} has no config.json; point at a directory written by vlpipe or HF")
    model = (
        InternVLForConditionalGeneration.from_pretrained(
            path, config=read_config(path), dtype=dtype or torch.float32
        )
        .to(device)
        .eval()
    )
    tokenizer = add_internvl_tokens(AutoTokenizer.from_pretrained(path))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    image_cfg = ImageProcessingConfig.from_pretrained(path)
    meta_path = Path(path) / VLPIPE_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    added = fit_embeddings(model, tokenizer)
    if added:
        metadata["added_tokens"] = [*metadata.get("added_tokens", []), *added]
    if metadata.get("preset") in (None, "unknown"):
        metadata.pop("preset", None)
        matched = preset_for_config(model.config)
        if matched is not None:
            metadata["preset"] = matched
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_cfg=image_cfg,
        v2pe_delta=float(getattr(model.config, V2PE_CONFIG_KEY, 1.0)),
        tokens_per_tile=int(model.config.image_seq_length),
        path=path,
        metadata=metadata,
    )


def read_config(path: str | Path) -> Any:
    """The checkpoint's config as runtimes should read it: a `config.json` without a top-level
    `tie_word_embeddings` (published InternVL3 ones) makes transformers 5 tie the LM head to the embeddings
    whatever the text config says; the text config's value decides here."""
    config = AutoConfig.from_pretrained(path)
    raw = json.loads((Path(path) / "config.json").read_text())
    if "tie_word_embeddings" not in raw and "tie_word_embeddings" in raw.get("text_config", {}):
        config.tie_word_embeddings = bool(raw["text_config"]["tie_word_embeddings"])
    tensors = tensor_info(path)
    if tensors and not any(k in tensors for k in LM_HEAD_KEYS):  # the weights decide: no LM head means tied
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    return config


LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
"""Where the LM head is in a checkpoint's safetensors (transformers 5's names, and the published 4.x layout)."""


def tensor_info(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Name → (safetensors dtype, shape) of every tensor in a checkpoint directory (headers only, no weights)."""
    info: dict[str, tuple[str, list[int]]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                info[name] = (entry["dtype"], entry["shape"])
    return info


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    save_dtype: SaveDtype = "bf16",
    metadata: dict | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write `source` again as the exported checkpoint runtimes take as it is: weights in `save_dtype`
    (recorded in `config.json` as `dtype` and in `vlpipe.json` as `save_dtype`), everything else as
    `save_checkpoint` writes it.

    Args:
        source: a checkpoint (local or `s3://`), usually the last stage's, in training precision.
        out: destination directory (local or `s3://`).
        save_dtype: bf16 (published InternVL3's), fp16 or fp32.
        metadata: extra facts for `vlpipe.json`.
        storage_options: fsspec options for remote paths.

    Returns:
        `out` as a string.
    """
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}; got {save_dtype!r}")
    loaded = load_checkpoint(source, dtype=SAVE_DTYPES[save_dtype], storage_options=storage_options)
    info = {**loaded.metadata, "save_dtype": save_dtype, "exported_from": str(source), **(metadata or {})}
    info.pop("dtype", None)
    return save_checkpoint(
        out, loaded.model, loaded.tokenizer, loaded.image_cfg, metadata=info, storage_options=storage_options
    )
