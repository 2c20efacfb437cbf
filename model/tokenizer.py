"""Tokenizers: InternVL's special tokens on any Hugging Face tokenizer, or a byte-level BPE trained offline.

Production uses the Qwen2.5 tokenizer from a local or `s3://` directory; tests and the demo train a small
byte-level BPE with the `tokenizers` library on the demo corpus (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# InternVL adds these nine tokens to Qwen2.5's vocabulary (151665 + 9 = 151674).
INTERNVL_ADDED_TOKENS = [
    IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN,
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]  # fmt: skip
CHAT_TOKENS = [PAD_TOKEN, IM_START, IM_END]
# Attributes transformers' InternVLProcessor reads from the tokenizer.
PROCESSOR_TOKEN_ATTRIBUTES = {
    "start_image_token": IMG_START_TOKEN,
    "end_image_token": IMG_END_TOKEN,
    "context_image_token": IMG_CONTEXT_TOKEN,
    "video_token": VIDEO_TOKEN,
}

# The chat template of InternVL2.5/3 in the transformers format (OpenGVLab's `*-hf` checkpoints): ChatML; image
# parts render as <IMG_CONTEXT>, which transformers' InternVLProcessor expands to <img> + 256·tiles <IMG_CONTEXT>
# + </img> (the same ids vlpipe.model.conversation produces from InternVL's "<image>" placeholder), video parts as
# <video>. InternVL's own training code (`internvl2_5` conversation) puts a default system message before every
# conversation; `chat_template(system_message)` adds one when the model was trained with it. vlpipe's stages
# train without a system message unless a data config sets one, so vlpipe's own checkpoints carry the template
# without a default system message: the prompt a runtime renders is the one the model was trained on.
INTERNVL_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def chat_template(system_message: str | None = None) -> str:
    """InternVL2.5/3's chat template, with `system_message` as the default system turn (None: no system turn
    unless the conversation has one)."""
    default_system = ""
    if system_message:
        quoted = system_message.replace("\\", "\\\\").replace("'", "\\'")
        default_system = (
            "{% if messages[0]['role'] != 'system' %}"
            f"{{{{ '<|im_start|>system\\n{quoted}<|im_end|>\\n' }}}}"
            "{% endif %}"
        )
    return (
        default_system + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
        "{% elif part['type'] == 'video' %}{{ '<video>\\n' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


CHAT_TEMPLATE = chat_template()
"""vlpipe's own template: InternVL2.5/3's without a default system message (what the stages train on)."""


def template_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system message the tokenizer's chat template adds to a conversation that has none (InternVL's
    default one for OpenGVLab's checkpoints), or None (vlpipe's own template, or no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain turn declares no default
        return None
    header = f"{IM_START}system\n"
    if not isinstance(text, str) or not text.startswith(header) or IM_END not in text:
        return None
    return text[len(header) : text.index(IM_END)] or None


def add_internvl_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add InternVL's image tokens and the ChatML tokens when missing; name the processor's tokens; set vlpipe's
    chat template when the tokenizer has none (a source checkpoint's template is kept).

    The tokenizer is modified in place and returned. Existing ids are never changed. `<video>` is named for
    transformers' InternVLProcessor but not added as a token: InternVL's tokenizer has none (151674 ids), and
    vlpipe's data code turns video into frames of `<image>` as InternVL's does.
    """
    missing = [t for t in CHAT_TOKENS + INTERNVL_ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    named = {
        k: v for k, v in PROCESSOR_TOKEN_ATTRIBUTES.items() if k not in tokenizer.SPECIAL_TOKENS_ATTRIBUTES
    }
    if named:
        # transformers 5 keeps named multimodal tokens (read by InternVLProcessor) in the special-tokens map and
        # saves them in tokenizer_config.json; this is the hook its own loader uses for them.
        tokenizer._set_model_specific_special_tokens(special_tokens=named)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on `texts` and add InternVL's special tokens.

    Byte-level means every string is encodable, whatever the corpus was.

    Args:
        texts: the training corpus.
        vocab_size: target size of the BPE vocabulary (special tokens come on top).

    Raises:
        ValueError: for a vocabulary smaller than the byte alphabet.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + merges); got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = add_internvl_tokens(
        PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD_TOKEN, model_max_length=1_000_000
        )
    )
    # vlpipe's own vocabulary keeps `<video>` as a token (after InternVL's, as it always had: the ids, and so the
    # random initialisation and the demo's measured results, stay as they were); the model gets a row for it.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False
    )
    return tokenizer


def default_corpus() -> list[str]:
    """A small built-in English corpus about shapes, colours and counting (used when no data is given)."""
    colours = ["red", "green", "blue", "yellow"]
    shapes = ["circle", "square", "triangle"]
    numbers = ["zero", "one", "two", "three", "four", "five", "six"]
    lines = []
    for c in colours:
        for s in shapes:
            lines.append(f"I see a {c} {s}. The {c} ones are the {s}.")
            lines.append(f"How many {c} shapes are there? How many {s}s are there?")
    for i, word in enumerate(numbers):
        lines.append(f"So the answer is {i}. {word.capitalize()} plus one is {i + 1}.")
    lines.append("Describe the image. A photo of a cat, a coffee cup, a rocket and an astronaut.")
    return lines * 4


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of `text` as data text is tokenised (special tokens split); it must be one token.

    Raises:
        ValueError: when the tokenizer splits `text` into several tokens (e.g. a PRM reply `+`).
    """
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {text!r} into {len(ids)} tokens {ids}; it must be one token")
    return int(ids[0])
