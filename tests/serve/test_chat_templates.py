"""A model without a chat template is still served for chat: in the documented default (ChatML), or in a template
given by name or file; /health says which. Checked against the ChatML prompt written out by hand."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from cli_runner import run_edgepack
from serving_helpers import MODEL_ID

from edgepack.core.errors import EdgepackError
from edgepack.serve.app import ServerConfig, start_server_thread
from edgepack.serve.model import LocalModel
from edgepack.serve.session import defaults_for, open_session
from runtimes.chat_templates import NAMED_CHAT_TEMPLATES, resolve_chat_template


@pytest.fixture(scope="module")
def base_gguf(tiny_model, tmp_path_factory):
    """The tiny llama of the server tests, saved without a chat template (a base model)."""
    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert

    root = tmp_path_factory.mktemp("base-model")
    source = root / "hf"
    shutil.copytree(tiny_model("llama-bpe"), source)
    (source / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    convert(source, ["gguf-f32"], root / "out", ConvertOptions(show_progress=False))
    return root / "out" / "gguf-f32.gguf"


def serve(path, template=None):
    model = open_session(defaults_for(path), context=256, parallel=1, chat_template=template, cls=LocalModel)
    model.model_id = MODEL_ID
    return model, start_server_thread(model, ServerConfig(port=0))


def test_a_base_model_chats_in_chatml_and_health_says_so(base_gguf):
    model, running = serve(base_gguf)
    try:
        health = httpx.get(f"{running.url}/health").json()
        assert health["chat_template"] == "default (chatml)"
        chat = httpx.post(f"{running.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8, "temperature": 0}).json()
        written_out = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"  # ChatML, by hand
        plain = httpx.post(f"{running.url}/v1/completions", json={
            "prompt": written_out, "max_tokens": 8, "temperature": 0}).json()
        assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
        assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    finally:
        running.stop()
        model.close()


def test_a_template_given_by_name_replaces_the_default(base_gguf):
    model, running = serve(base_gguf, NAMED_CHAT_TEMPLATES["plain"])
    try:
        assert httpx.get(f"{running.url}/health").json()["chat_template"] == "given"
        chat = httpx.post(f"{running.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8, "temperature": 0}).json()
        plain = httpx.post(f"{running.url}/v1/completions", json={
            "prompt": "User: Hi there\nAssistant:", "max_tokens": 8, "temperature": 0}).json()
        assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    finally:
        running.stop()
        model.close()


def test_bad_templates_are_refused_with_what_is_accepted(tmp_path):
    with pytest.raises(EdgepackError, match="chatml, llama2, plain"):
        resolve_chat_template("vicuna")
    not_a_template = tmp_path / "notes.txt"
    not_a_template.write_text("hello")
    with pytest.raises(EdgepackError, match="does not look like a chat template"):
        resolve_chat_template(not_a_template)
    done = run_edgepack(["serve", str(tmp_path / "missing.gguf"), "--chat-template", "vicuna"], timeout=60)
    assert done.returncode != 0 and "chatml, llama2, plain" in done.stderr
