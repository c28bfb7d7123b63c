"""/openapi.json tells the truth: schemathesis fuzzes every documented operation of a real server
(a tiny random llama behind an API key) and checks every answer against the document, with all of
its checks: no 5xx, no undocumented status or content type, responses matching their schemas,
schema-valid bodies accepted and schema-violating ones refused (400), 401 without the key.

Bounded: a few seeded examples per operation; the model's context of 32 tokens bounds every output.
"""
from __future__ import annotations

import os
import re

import pytest
from fixtures_models import build_checkpoint
from fixtures_server import running_server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (installed with schemathesis)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402

from mistralpy import AsyncEngine  # noqa: E402
from mistralpy.server import ServerOptions, create_app  # noqa: E402

KEY = "openapi-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# POST /v1/models/{id}/unload would turn every later request into a (documented) 503: it is an admin
# action tested in test_server_multi.py, not fuzzed here. The embedding routes are fuzzed against an
# embedding model, not this generation model (a generation model asked to embed is a 400 by design).
EXCLUDED = r"/unload$|/v1/embeddings|rerank|score"
# per operation and mode, seeded (derandomized): the same cases every run; more for a deeper look
EXAMPLES = int(os.environ.get("MISTRALPY_OPENAPI_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tokenizer_dir):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("openapi_llama"), "llama", tokenizer_dir)
    engine = AsyncEngine(str(ckpt), dtype="f32", num_kv_blocks=64, max_model_len=32, max_seqs=8)
    app = create_app(engine, ServerOptions(served_model_name="tiny", api_key=KEY, max_body_bytes=64 * 1024,
                                           log_interval_s=0))
    with running_server(app) as base:
        yield base
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(base_url + "/openapi.json")


load_all_checks()
ALL_CHECKS = CHECKS.get_all()
# Every documented operation but the EXCLUDED ones; test_every_route_is_fuzzed keeps this list whole.
# (schemathesis' own pytest.from_fixture needs pytest < 9, so each operation runs its own hypothesis test.)
OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/responses"), ("GET", "/v1/responses/{resp_id}"),
    ("DELETE", "/v1/responses/{resp_id}"), ("POST", "/v1/responses/{resp_id}/cancel"),
    ("GET", "/v1/responses/{resp_id}/input_items"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/models/{model_id}/reload"), ("GET", "/health"), ("GET", "/metrics"), ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]


# The 400s no JSON schema can rule out, each named by the field at fault: a prompt (in tokens) plus
# max_tokens longer than the context; a regex / JSON schema / grammar that does not compile; a
# tool_choice naming a tool the request does not define; a suffix (fill-in-the-middle) for a model
# without FIM tokens or with token-id prompts; the couplings of best_of >= n (and not streamed when
# more), min_tokens <= max_tokens, background needing store and no stream. Anthropic's error body names no field, so
# there the message says it. Every other 400 of a schema-valid body fails the test.
SEMANTIC_PARAMS = {"prompt", "max_tokens", "grammar", "response_format", "text.format", "output_config.format",
                   "tool_choice", "suffix", "best_of", "min_tokens", "background"}
SEMANTIC_MESSAGE = re.compile(r"^(the prompt has \d+ tokens|prompt \(\d+ tokens\) \+ max_tokens|invalid \w+ grammar"
                              r"|tool_choice )")


def _semantic_400(response) -> bool:
    if response.status_code != 400:
        return False
    error = response.json().get("error") or {}
    if "param" in error:  # OpenAI's shape
        return error["param"] in SEMANTIC_PARAMS and (error["param"] not in ("prompt", "max_tokens")
                                                      or error.get("code") == "context_length_exceeded")
    return bool(SEMANTIC_MESSAGE.match(error.get("message", "")))


def positive_data_acceptance(ctx, response, case):
    """schemathesis' check, less the semantic 400s above."""
    if _semantic_400(response):
        return None
    return BUILTIN_POSITIVE(ctx, response, case)


BUILTIN_POSITIVE = next(c for c in ALL_CHECKS if c.__name__ == "positive_data_acceptance")
CHECKS_USED = [c for c in ALL_CHECKS if c is not BUILTIN_POSITIVE] + [positive_data_acceptance]
NO_INPUT = {"/health", "/metrics"}  # no parameters, no key: nothing to make invalid


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_openapi_tells_the_truth(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    if mode is GenerationMode.NEGATIVE and path in NO_INPUT:
        pytest.skip("no input to make invalid")
    operation = api_schema[path][method]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        case.call_and_validate(headers=AUTH, checks=CHECKS_USED, timeout=60)

    fuzz()


def test_every_route_is_fuzzed(api_schema) -> None:
    documented = {(method.upper(), path) for path, item in api_schema.raw_schema["paths"].items() for method in item}
    assert documented - set(OPERATIONS) == {op for op in documented if re.search(EXCLUDED, op[1])}


def test_document_has_no_422_and_documents_errors(api_schema) -> None:
    """Spot checks of the document itself (the fuzzing above checks the rest)."""
    raw = api_schema.raw_schema
    ops = [(path, method, op) for path, item in raw["paths"].items() for method, op in item.items()]
    assert ops and all("422" not in op["responses"] for _, _, op in ops)
    for path, _, op in ops:
        assert {"413", "500"} <= set(op["responses"]), path
        if path not in ("/health", "/metrics", "/openapi.json"):
            assert "401" in op["responses"] and op.get("security"), path
    chat = raw["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"] and "application/json" in chat["200"]["content"]
    msg_400 = raw["paths"]["/v1/messages"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert msg_400["$ref"].endswith("/AnthropicError")
    props = raw["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 31  # the default model's context, filled in
