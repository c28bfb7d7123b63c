"""mistral.rs's Python API (Runner, Which, ChatCompletionRequest, CompletionRequest) on our engine."""
from __future__ import annotations

import pytest
from fixtures_models import build_checkpoint

from mistralpy import (
    ChatCompletionRequest,
    CompletionRequest,
    Engine,
    Runner,
    SamplingParams,
    UnsupportedModelKindError,
    Which,
)
from mistralpy.compat import Architecture, ModelDType
from mistralpy.errors import InvalidRequestError, ModelLoadError

CHAT = [{"role": "user", "content": "Tell me a story about the Rust type system."}]
SMALL = {"num_kv_blocks": 64, "max_model_len": 256}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("compat_llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def runner(ckpt):
    r = Runner(which=Which.Plain(model_id=str(ckpt), arch=None, tokenizer_json=None, dtype=ModelDType.F32),
               max_seqs=4, token_source="none", no_kv_cache=False, prefix_cache_n=16, **SMALL)
    yield r
    r.shutdown()


def test_chat_matches_engine_and_shapes(runner, ckpt):
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=CHAT, max_tokens=8, temperature=0.0, top_p=0.1, top_k=5, presence_penalty=0.0,
        ignore_eos=True))
    assert res.object == "chat.completion" and res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 8 and res.usage.total_tokens == res.usage.prompt_tokens + 8
    assert res.usage.avg_compl_tok_per_sec >= 0 and res.usage.total_time_sec >= 0
    # The same greedy answer through the native API.
    text = runner.engine.render_chat(CHAT)
    native = runner.engine.generate(runner.engine.tokenize(text, False),
                                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert res.choices[0].message.content == native.outputs[0].text


def test_chat_stream_n_choices_stop_seqs(runner):
    req = {"model": "default", "messages": CHAT, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    full = runner.send_chat_completion_request(ChatCompletionRequest(**req)).choices[0].message.content
    chunks = list(runner.send_chat_completion_request(ChatCompletionRequest(**req, stream=True)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    two = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=CHAT, max_tokens=4, n_choices=2, temperature=1.0, seed=3, ignore_eos=True))
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 8
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = runner.send_chat_completion_request(ChatCompletionRequest(**{**req, "max_tokens": 6}, stop_seqs=[stop]))
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:full.find(stop)]
    pre = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=runner.engine.render_chat(CHAT), max_tokens=6, temperature=0.0, ignore_eos=True))
    assert pre.choices[0].message.content == full  # a string is an already templated prompt


def test_completion_echo_best_of_stream(runner):
    base = {"model": "default", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.0,
            "ignore_eos": True}
    res = runner.send_completion_request(CompletionRequest(**base))
    assert res.object == "text_completion" and res.usage.completion_tokens == 5
    echo = runner.send_completion_request(CompletionRequest(**base, echo_prompt=True))
    assert echo.choices[0].text == "Once upon a time" + res.choices[0].text
    best = runner.send_completion_request(CompletionRequest(**{**base, "temperature": 1.0}, best_of=3, n_choices=1,
                                                            seed=1))
    assert len(best.choices) == 1 and best.usage.completion_tokens == 15
    chunks = list(runner.send_completion_request(CompletionRequest(**base, stream=True)))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text and chunks[-1].usage.completion_tokens == 5


def test_refusals(runner, ckpt):
    for which in (Which.VisionPlain(model_id="x"), Which.DiffusionPlain(model_id="x"), Which.Speech(model_id="x"),
                  Which.Lora(adapter_model_id="a"), Which.XLora(xlora_model_id="a", order="o"),
                  Which.GGML(quantized_model_id="a", quantized_filename="b")):
        with pytest.raises(UnsupportedModelKindError, match=f"Which.{type(which).__name__} is not supported"):
            Runner(which=which)
    assert issubclass(UnsupportedModelKindError, NotImplementedError)
    with pytest.raises(UnsupportedModelKindError, match="speculative"):
        Runner(which=Which.Plain(model_id=str(ckpt)), which_draft=Which.Plain(model_id=str(ckpt)))
    with pytest.raises(InvalidRequestError, match="grammar_type"):
        runner.send_chat_completion_request(ChatCompletionRequest(model="default", messages=CHAT, grammar="x",
                                                                  grammar_type="ebnf"))
    with pytest.raises(InvalidRequestError, match="does not take images"):
        image = {"type": "image_url", "image_url": {"url": "x"}}
        runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": [image]}]))
    with pytest.raises(InvalidRequestError, match="best_of"):
        runner.send_completion_request(CompletionRequest(model="default", prompt="a", n_choices=2, best_of=1))
    with pytest.raises(ModelLoadError):  # a Llama checkpoint forced to load as Gemma 2 is a clear load error
        Runner(which=Which.Plain(model_id=str(ckpt), arch=Architecture.Gemma2), **SMALL)
    with pytest.raises(InvalidRequestError, match="unexpected keyword"):
        Runner(which=Which.Plain(model_id=str(ckpt)), not_an_option=1)


def test_grammar_and_response_format(runner):
    """mistral.rs's grammar/grammar_type pair and OpenAI's response_format constrain the output."""
    import json
    import re

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=CHAT, grammar=r"[a-c]{3}-[0-9]{2}", grammar_type="regex", max_tokens=20,
        temperature=1.0, seed=3))
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", res.choices[0].message.content)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"],
              "additionalProperties": False}
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=CHAT, max_tokens=200, temperature=1.0, seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}))
    assert res.choices[0].finish_reason == "stop"
    assert 0 <= json.loads(res.choices[0].message.content)["n"] <= 999


def test_isq_plain_and_arch_name(ckpt):
    with Runner(which=Which.Plain(model_id=str(ckpt), arch="llama"), in_situ_quant="Q8_0", dtype="f32",
                max_seqs=2, **SMALL) as r:
        assert r.engine.model_config.isq is not None
        res = r.send_chat_completion_request(ChatCompletionRequest(model="x", messages=CHAT, max_tokens=3))
        assert res.model == "x" and res.usage.completion_tokens >= 1


def test_gguf_smollm2_local_folder():
    from assets import smollm2_gguf_path

    path = smollm2_gguf_path()
    with Runner(which=Which.GGUF(tok_model_id=None, quantized_model_id=str(path.parent),
                                 quantized_filename=path.name), max_seqs=2, num_kv_blocks=32,
                dtype="f32") as r:  # float activations: the exact answer (see tests/test_gguf_smollm2.py)
        res = r.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0.0))
        assert "Paris" in res.choices[0].message.content
        native = Engine(str(path), num_kv_blocks=32, max_seqs=1, dtype="f32")
        try:
            assert native.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
                               temperature=0.0).choices[0].message.content == res.choices[0].message.content
        finally:
            native.shutdown()
