"""`vlpipe model check`: passes on what vlpipe writes, and finds each problem it names."""

import json

import pytest
from typer.testing import CliRunner

from vlpipe.model.check import check_checkpoint
from vlpipe.model.checkpoint import save_checkpoint
from vlpipe.pipelines.cli import app


@pytest.fixture()
def written(tmp_path, tiny_model, tiny_tokenizer, tiny_image_cfg):
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"preset": "tiny"})
    return tmp_path / "ck"


def _edit(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


def _codes(path):
    return {code for code, _ in check_checkpoint(path).problems}


def test_what_vlpipe_writes_passes(written):
    report = check_checkpoint(written)
    assert report.ok, report.problems
    assert report.facts["dtype"] == "float32" and report.facts["tied"] is False
    assert report.facts["default_system_message"] is False
    result = CliRunner().invoke(app, ["model", "check", str(written)])
    assert result.exit_code == 0 and "ok" in result.output


def test_a_token_beyond_the_embeddings(written, tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(written)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(written)
    assert _codes(written) == {"vocabulary"}
    result = CliRunner().invoke(app, ["model", "check", str(written), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["problems"][0]["code"] == "vocabulary"


def test_image_token_id_not_img_context(written):
    _edit(written / "config.json", lambda c: c.update(image_token_id=3))
    assert _codes(written) == {"vocabulary"}


def test_no_eos(written):
    _edit(written / "generation_config.json", lambda c: c.pop("eos_token_id"))
    assert _codes(written) == {"eos"}
    _edit(written / "config.json", lambda c: c.update(eos_token_id=None))
    assert _codes(written) == {"eos"}


def test_tie_flags(written):
    _edit(written / "config.json", lambda c: c.pop("tie_word_embeddings"))
    assert _codes(written) == {"tie"}  # transformers 5 would tie what the text config says is untied
    _edit(written / "config.json", lambda c: c.update(tie_word_embeddings=True))
    assert _codes(written) == {"tie"}


def test_dtype_disagreeing_with_the_weights(written):
    _edit(written / "config.json", lambda c: c.update(dtype="bfloat16"))
    assert _codes(written) == {"dtype"}


def test_rope_theta_missing_for_transformers_4(written):
    _edit(written / "config.json", lambda c: c["text_config"].pop("rope_theta"))
    assert _codes(written) == {"rope"}


def test_template_missing_or_not_chatml(written):
    for name in ("chat_template.jinja",):
        (written / name).unlink(missing_ok=True)
    _edit(written / "tokenizer_config.json", lambda c: c.pop("chat_template", None))
    assert _codes(written) == {"template"}
    (written / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert _codes(written) == {"template"}


def test_processor_config(written):
    _edit(written / "processor_config.json", lambda c: c.update(image_seq_length=999))
    assert _codes(written) == {"processor"}
    (written / "preprocessor_config.json").unlink()
    assert _codes(written) == {"processor"}


def test_not_a_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["model", "check", str(tmp_path)])
    assert result.exit_code == 2 and "config.json" in result.output
