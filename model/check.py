"""`vlpipe model check DIR`: read a checkpoint directory the way runtimes do (transformers' `AutoConfig` and
`AutoTokenizer`, the safetensors headers, the processor files) and report what would make a runtime go wrong.

Each problem has a code:

- `vocabulary`: a token id at or beyond the embedding rows (the model would index out of range), or InternVL's
  image tokens missing, or `image_token_id` not the id of `<IMG_CONTEXT>`;
- `eos`: `config.json` or `generation_config.json` without `<|im_end|>` as EOS (plain `generate` never stops);
- `tie`: top-level and text-config `tie_word_embeddings` disagree or the top level has none (transformers 5 then
  ties the LM head to the embeddings), or the weights lack the LM head the flags promise;
- `dtype`: the weights' dtype is not the one `config.json` names;
- `rope`: the text config has no `rope_theta` (transformers 4.x would run with θ = 10000);
- `template`: no chat template, or one that does not render ChatML;
- `processor`: no GotOcr2 image processor config, `image_seq_length` disagreeing with the model's, or a tokenizer
  that does not name the tokens transformers' InternVLProcessor reads;
- `commit`: the commit marker (`COMMITTED`, written last by `save_checkpoint` to an object store) lists a file
  that is missing or has another size (an upload cut off or overwritten).

Facts (dtype, vocabulary, template with or without a default system message) are reported beside the problems.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlpipe.model.checkpoint import LM_HEAD_KEYS, file_manifest, read_commit, tensor_info
from vlpipe.model.tokenizer import IM_END, IM_START, IMG_CONTEXT_TOKEN, INTERNVL_ADDED_TOKENS

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_EMBED_KEYS = ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight")


@dataclass
class CheckReport:
    """What `check_checkpoint` found: `problems` as (code, message) pairs and `facts` about the checkpoint."""

    path: str
    problems: list[tuple[str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, code: str, message: str) -> None:
        self.problems.append((code, message))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": [{"code": c, "message": m} for c, m in self.problems],
            "facts": self.facts,
        }


def check_checkpoint(directory: str | Path) -> CheckReport:
    """Check a local checkpoint directory (see the module docstring for what is checked).

    Raises:
        FileNotFoundError: when the directory has no `config.json`.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(directory)
    report = CheckReport(str(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; point at a checkpoint directory")
    raw = json.loads((path / "config.json").read_text())
    text_raw = raw.get("text_config", {})
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tensors = tensor_info(path)
    vocab = tokenizer.get_vocab()

    # vocabulary
    embed = next((tensors[k] for k in _EMBED_KEYS if k in tensors), None)
    rows = embed[1][0] if embed else int(text_raw.get("vocab_size", 0))
    top_id = max(vocab.values())
    report.facts.update(
        tokenizer_ids=top_id + 1, embedding_rows=rows, tokenizer_class=type(tokenizer).__name__
    )
    if top_id >= rows:
        beyond = sorted((i, t) for t, i in vocab.items() if i >= rows)
        report.add(
            "vocabulary",
            f"the tokenizer has ids up to {top_id} but the embeddings have {rows} rows; tokens without a row: "
            f"{[t for _, t in beyond][:10]} (load with vlpipe, which adds rows, or remove them)",
        )
    missing = [t for t in [IM_START, IM_END, *INTERNVL_ADDED_TOKENS] if t not in vocab]
    if missing:
        report.add("vocabulary", f"the tokenizer lacks {missing}")
    elif raw.get("image_token_id") != vocab[IMG_CONTEXT_TOKEN]:
        report.add(
            "vocabulary",
            f"image_token_id is {raw.get('image_token_id')} but <IMG_CONTEXT> is {vocab[IMG_CONTEXT_TOKEN]}",
        )

    # eos
    im_end = vocab.get(IM_END)
    for where, value in (
        ("config.json", raw.get("eos_token_id")),
        ("text_config", text_raw.get("eos_token_id")),
    ):
        if im_end is not None and im_end not in (value if isinstance(value, list) else [value]):
            report.add("eos", f"{where} eos_token_id is {value}, not <|im_end|> ({im_end})")
    generation_path = path / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    eos = generation.get("eos_token_id")
    if im_end is not None and im_end not in (eos if isinstance(eos, list) else [eos]):
        report.add(
            "eos", f"generation_config.json eos_token_id is {eos}: generate does not stop at <|im_end|>"
        )

    # tie
    top_tie, text_tie = raw.get("tie_word_embeddings"), text_raw.get("tie_word_embeddings")
    if top_tie is None:
        report.add(
            "tie",
            f"config.json has no top-level tie_word_embeddings (text config: {text_tie}); transformers 5 then ties "
            "the LM head to the embeddings",
        )
    elif text_tie is not None and bool(top_tie) != bool(text_tie):
        report.add(
            "tie", f"tie_word_embeddings is {top_tie} at the top level but {text_tie} in the text config"
        )
    has_head = any(k in tensors for k in LM_HEAD_KEYS)
    if tensors and not bool(config.tie_word_embeddings) and not has_head:
        report.add("tie", "the config says the LM head is not tied but the weights have no lm_head")
    report.facts["tied"] = not has_head

    # dtype
    dtypes = sorted({_DTYPES.get(d, d) for d, _ in tensors.values()})
    named = raw.get("dtype") or raw.get("torch_dtype")
    report.facts.update(dtype=dtypes[0] if len(dtypes) == 1 else dtypes, config_dtype=named)
    if named and dtypes and dtypes != [named]:
        report.add("dtype", f"config.json names dtype {named} but the weights are {', '.join(dtypes)}")

    # rope
    if "rope_theta" not in text_raw:
        report.add("rope", "the text config has no rope_theta: transformers 4.x would use θ = 10000")

    # template
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        report.add("template", "the tokenizer has no chat template")
    else:
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a broken template is a finding, whatever jinja raises
            report.add("template", f"the chat template does not render: {exc}")
        else:
            if f"{IM_START}user\nHi{IM_END}\n" not in rendered or not rendered.endswith(
                f"{IM_START}assistant\n"
            ):
                report.add("template", f"the chat template does not render ChatML: {rendered!r}")
            report.facts["default_system_message"] = rendered.startswith(f"{IM_START}system\n")

    # processor
    image_path = path / "preprocessor_config.json"
    image = json.loads(image_path.read_text()) if image_path.exists() else {}
    if not str(image.get("image_processor_type", "")).startswith("GotOcr2ImageProcessor"):
        report.add("processor", "preprocessor_config.json is missing or not a GotOcr2 image processor")
    processor_path = path / "processor_config.json"
    processor = json.loads(processor_path.read_text()) if processor_path.exists() else {}
    if processor.get("image_seq_length", raw.get("image_seq_length")) != raw.get("image_seq_length"):
        report.add(
            "processor",
            f"processor_config.json image_seq_length {processor.get('image_seq_length')} but the model has "
            f"{raw.get('image_seq_length')}",
        )
    unnamed = [
        a for a in ("start_image_token", "end_image_token", "context_image_token", "video_token")
        if not getattr(tokenizer, a, None)
    ]  # fmt: skip
    if unnamed:
        report.add("processor", f"the tokenizer does not name {unnamed} (InternVLProcessor reads them)")

    # commit
    record = read_commit(str(path))
    report.facts["commit_marker"] = record is not None
    if record is not None:
        found = file_manifest(path)
        wrong = sorted(n for n, size in record["files"].items() if found.get(n) != size)
        if wrong:
            report.add(
                "commit", f"files the commit marker lists are missing or of another size: {wrong[:10]}"
            )
    return report
