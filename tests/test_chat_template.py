"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""
from __future__ import annotations

import pytest
from assets import load_hf, load_mistralpy, real_tokenizer_dir, smollm2_chat_template_path

from mistralpy.errors import ChatTemplateError
from mistralpy.tokenizer.chat_template import ChatTemplate

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — température, ☀️",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]},
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Web search",
                                                "parameters": {"type": "object", "properties": {
                                                    "q": {"type": "string"}}, "required": ["q"]}}}

SIMPLE = [{"role": "user", "content": "Hello! 日本語 😀"}]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "  What is 2+2?  "},
               {"role": "assistant", "content": "4"},
               {"role": "user", "content": "And 3+3?"}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Tokyo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 25}"},
]
THINKING_HISTORY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello!"},
    {"role": "user", "content": "Count to 3"},
    {"role": "assistant", "content": "1 2 3", "reasoning_content": "Easy."},
]


def _hf_render(hf, messages, template: str | None = None, **kwargs):
    return hf.apply_chat_template(messages, tokenize=False, chat_template=template, **kwargs)


def _both(name: str):
    path = str(real_tokenizer_dir(name))
    return load_mistralpy(path), load_hf(path)


@pytest.mark.parametrize("case", [
    {"messages": SIMPLE},
    {"messages": SIMPLE, "add_generation_prompt": False},
    {"messages": WITH_SYSTEM},
    {"messages": WITH_SYSTEM, "enable_thinking": False},
    {"messages": WITH_SYSTEM, "enable_thinking": True},
    {"messages": SIMPLE, "tools": [WEATHER_TOOL, SEARCH_TOOL]},
    {"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL]},
    {"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL], "enable_thinking": False},
    {"messages": TOOL_CONVERSATION[1:]},
    {"messages": THINKING_HISTORY},
    {"messages": THINKING_HISTORY + [{"role": "user", "content": "More"}], "enable_thinking": False},
], ids=lambda c: "-".join(f"{k}" for k in c if k != "messages") + f"-{len(c['messages'])}msgs")
def test_qwen3_matches_transformers(case):
    ours, hf = _both("qwen3")
    case = dict(case)
    messages = case.pop("messages")
    case.setdefault("add_generation_prompt", True)
    expected = _hf_render(hf, messages, **case)
    assert ours.apply_chat_template(messages, **case) == expected
    if case.get("enable_thinking") is False:
        assert expected.endswith("<think>\n\n</think>\n\n")


def test_llama3_matches_transformers():
    ours, hf = _both("llama3")
    for messages in (SIMPLE, WITH_SYSTEM):
        for tools in (None, [WEATHER_TOOL]):
            expected = _hf_render(hf, messages, tools=tools, add_generation_prompt=True)
            assert ours.apply_chat_template(messages, tools=tools) == expected
            assert expected.startswith("<|begin_of_text|><|start_header_id|>")


# A Llama-3.1-style tool-calling template (written for this test): dates via strftime_now,
# tools as indented JSON in the first user message, tool calls as JSON, tool results as `ipython`.
LLAMA31_STYLE_TOOLS = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Knowledge cutoff: Dec 2023\\nToday: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "Call functions by replying with JSON {\\"name\\": ..., \\"parameters\\": ...}.\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Functions you can call:\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This template supports one tool call per message.") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}{{- "}" }}{{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""


def test_llama31_style_tool_template_matches_transformers():
    ours, hf = _both("llama3")
    one_call = [TOOL_CONVERSATION[0], TOOL_CONVERSATION[1],
                {"role": "assistant", "tool_calls": [TOOL_CONVERSATION[2]["tool_calls"][0]]},
                TOOL_CONVERSATION[3]]
    tmpl = ChatTemplate(LLAMA31_STYLE_TOOLS, bos_token=ours.bos_token, eos_token=ours.eos_token)
    for kwargs in ({}, {"tools_in_user_message": False}, {"date_string": "26 Jul 2024"}):
        for messages in (one_call, WITH_SYSTEM):
            expected = _hf_render(hf, messages, LLAMA31_STYLE_TOOLS, tools=[WEATHER_TOOL],
                                  add_generation_prompt=True, **kwargs)
            assert tmpl.render(messages, tools=[WEATHER_TOOL], **kwargs) == expected
    assert '"city": "Paris"' in tmpl.render(one_call, tools=[WEATHER_TOOL])
    with pytest.raises(ChatTemplateError, match="one tool call"):
        tmpl.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])


def test_gemma3_matches_transformers():
    ours, hf = _both("gemma3")
    multimodal = [{"role": "system", "content": [{"type": "text", "text": "Describe briefly."}]},
                  {"role": "user", "content": [{"type": "image", "url": "x.png"},
                                               {"type": "text", "text": " What is this? "}]}]
    for messages in (SIMPLE, WITH_SYSTEM, multimodal):
        for agp in (True, False):
            expected = _hf_render(hf, messages, add_generation_prompt=agp)
            assert ours.apply_chat_template(messages, add_generation_prompt=agp) == expected
    assert ours.apply_chat_template(SIMPLE).startswith("<bos><start_of_turn>user\n")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        ours.apply_chat_template(bad)
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        _hf_render(hf, bad)


def test_smollm2_matches_transformers(tokenizer_dir):
    source = smollm2_chat_template_path().read_text(encoding="utf-8")
    hf = load_hf(str(tokenizer_dir))
    tmpl = ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    for messages in (SIMPLE, WITH_SYSTEM):
        for agp in (True, False):
            assert tmpl.render(messages, add_generation_prompt=agp) == \
                _hf_render(hf, messages, source, add_generation_prompt=agp)
    assert "You are a helpful AI assistant named SmolLM" in tmpl.render(SIMPLE)


def test_fixture_chatml_matches_transformers(tokenizer_dir):
    ours, hf = load_mistralpy(str(tokenizer_dir)), load_hf(str(tokenizer_dir))
    for messages in (SIMPLE, WITH_SYSTEM):
        for agp in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=agp) == \
                _hf_render(hf, messages, add_generation_prompt=agp)
    assert ours.apply_chat_template(SIMPLE) == "<|im_start|>user\nHello! 日本語 😀<|im_end|>\n<|im_start|>assistant\n"


FEATURES = """{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}
{% generation %}[{{ m.role }}]{{ m.content }}{% endgeneration %}
{% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}
{{ tools | tojson }}|{{ tools | tojson(indent=2, sort_keys=True) }}|{{ {'b': 1, 'a': 'é<>&'} | tojson(separators=(',', ':')) }}
{{ bos_token }}{{ eos_token }}{{ pad_token }}{{ documents | length if documents else 'nodocs' }}{{ custom | default('x') }}
{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}
{{ dict(a=1) | tojson }}{{ strftime_now('%Y') | length }}{{ messages[0].get('content') }}{{ 'thinking' in messages[-1] }}
"""


def test_features_match_transformers(tokenizer_dir):
    """Loop controls, generation blocks, tojson options, namespaces, dict, documents, extra kwargs."""
    ours, hf = load_mistralpy(str(tokenizer_dir)), load_hf(str(tokenizer_dir))
    messages = [{"role": "user", "content": "u1"}, {"role": "skip", "content": "no"},
                {"role": "assistant", "content": "a1", "reasoning": "hmm"},
                {"role": "user", "content": "u2"}, {"role": "user", "content": "u3"}]
    tmpl = ChatTemplate(FEATURES, bos_token=ours.bos_token, eos_token=ours.eos_token,
                        extra_context={"pad_token": ours.pad_token})
    docs = [{"title": "t", "text": "body"}]
    for kwargs in ({}, {"custom": "C", "documents": docs}):
        assert tmpl.render(messages, tools=[WEATHER_TOOL], **kwargs) == \
            _hf_render(hf, messages, FEATURES, tools=[WEATHER_TOOL], add_generation_prompt=True, **kwargs)
    out = tmpl.render(messages, tools=[WEATHER_TOOL])
    assert "température" in out and '{"b":1,"a":"é<>&"}' in out


def test_continue_final_message_matches_transformers(tokenizer_dir):
    ours, hf = load_mistralpy(str(tokenizer_dir)), load_hf(str(tokenizer_dir))
    messages = SIMPLE + [{"role": "assistant", "content": "The answer is"}]
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True) == expected
    assert expected.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_none_values_and_objects_are_normalised(tokenizer_dir):
    """Keys set to None are dropped (OpenAI clients send content=None); pydantic-like objects become dicts."""
    class Msg:
        def __init__(self, **kw):
            self.kw = kw

        def model_dump(self):
            return dict(self.kw)

    tmpl = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content is defined }};{% endfor %}")
    assert tmpl.render([Msg(role="user", content="x"), {"role": "assistant", "content": None}]) == \
        "user:True;assistant:False;"


def test_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render(SIMPLE)
    with pytest.raises(ChatTemplateError, match="syntax"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute games
        ChatTemplate("{{ ''.__class__.__mro__ }}").render(SIMPLE)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(SIMPLE)
    with pytest.raises(ChatTemplateError):  # the immutable sandbox refuses mutation
        ChatTemplate("{{ messages.append(1) }}").render(SIMPLE)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("x").render(SIMPLE, tools=["not a dict"])


def test_templates_are_compiled_once():
    a = ChatTemplate("{{ messages | length }}")
    b = ChatTemplate("{{ messages | length }}", bos_token="<s>")
    assert a._template is b._template
    assert a.render(SIMPLE) == "1"
