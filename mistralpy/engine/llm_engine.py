"""Engine: the synchronous Python API. Thread-safe: many threads may call one Engine at once.

Every call submits requests to the shared EngineLoop thread, so concurrent callers are batched
together by the scheduler (continuous batching).
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mistralpy.engine import openai_format as oai
from mistralpy.engine.builder import EngineOptions, build_core, generation_defaults
from mistralpy.engine.chat_output import ChatSpec, chat_spec
from mistralpy.engine.core import EngineCore, SeqUpdate
from mistralpy.engine.input_processor import InputProcessor, Prompt, is_token_ids, new_request_id
from mistralpy.engine.loop import EngineLoop
from mistralpy.engine.media_input import MediaInput, media_refs, split_media_parts
from mistralpy.engine.output_tracker import RequestTracker
from mistralpy.engine.outputs import OpenAIObject, RequestOutput
from mistralpy.errors import EngineDeadError, InvalidRequestError
from mistralpy.multimodal.inputs import MediaError
from mistralpy.sampling_params import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_ALIASES = {"max_completion_tokens": "max_tokens"}


def sampling_from_kwargs(kwargs: dict[str, Any], base: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from keyword arguments (OpenAI spellings accepted); unknown keys are an error."""
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in kwargs.items():
        key = _ALIASES.get(key, key)
        if key not in _SAMPLING_FIELDS:
            raise InvalidRequestError(f"unknown sampling option {key!r}", key)
        if value is not None:
            values[key] = value
    try:
        return SamplingParams(**values)
    except TypeError as exc:
        raise InvalidRequestError(str(exc)) from exc


def normalize_messages(messages: Sequence[dict[str, Any]], images: list[Any] | None = None) -> list[dict[str, Any]]:
    """Validate chat messages; text-part lists become plain strings (joined by newlines). With
    ``images`` (a media model), image parts are collected there in order and their message keeps
    a part list ({"type": "text"} / {"type": "image"}) for the template; without, they are refused."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'", "messages")
        msg = dict(msg)
        content = msg.get("content")
        if isinstance(content, list):
            parts, has_images = split_media_parts(content, f"messages[{i}]", images)
            msg["content"] = parts if has_images else "\n".join(p["text"] for p in parts)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of parts", "messages")
        if msg.get("content") is None:
            msg["content"] = ""  # an assistant turn that only calls tools: templates still read its content
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_template_tool_call(c) for c in msg["tool_calls"]]
        out.append(msg)
    return out


def _template_tool_call(call: Any) -> Any:
    """OpenAI sends a call's arguments as JSON text; chat templates expect the object (as
    transformers' and vLLM's do), and would otherwise encode the text a second time."""
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return call
        if isinstance(args, dict):
            return {**call, "function": {**fn, "arguments": args}}
    return call


def _mcp_config(value: Any) -> Any:
    """The MCP client config of ``Engine(mcp_config=...)``, else of $MCP_CONFIG_PATH; None: no MCP."""
    import os

    if value is None and not os.environ.get("MCP_CONFIG_PATH"):
        return None  # the common case imports nothing
    from mistralpy.mcp.config import config_from_env, load_config

    config = config_from_env() if value is None else load_config(value)
    return config if config is not None and config.enabled_servers else None


def _server_tools(options: EngineOptions, mcp: Any) -> Any:
    """The engine's server-side tool providers (an empty, false ServerTools when there are none)."""
    from mistralpy.engine.tool_rounds import McpTools, ServerTools

    providers: list[Any] = [McpTools(mcp)] if mcp is not None else []
    if options.tool_dispatch_url:
        from mistralpy.engine.tool_dispatch import DispatchTools

        providers.append(DispatchTools.from_options(options.tool_dispatch_url, options.tool_dispatch_tools,
                                                    options.tool_dispatch_timeout_s))
    if options.enable_search or options.search_callback is not None:
        from mistralpy.search import SearchTools

        providers.append(SearchTools(options.search_backend, callback=options.search_callback))
    return ServerTools(providers)


class _Collector:
    """Sink that gathers one request's updates until all its choices finish."""

    def __init__(self, tracker: RequestTracker) -> None:
        self.tracker = tracker
        self.done = threading.Event()

    def __call__(self, update: SeqUpdate) -> None:
        self.tracker.apply(update)
        if self.tracker.finished:
            self.done.set()


class Engine:
    """Load a model and generate. ``model`` is a hub id or a local folder."""

    def __init__(self, model: str, **options: Any) -> None:
        try:
            self.options = EngineOptions(**options)
        except TypeError as exc:
            raise InvalidRequestError(f"Engine: {exc}") from exc
        mcp_config = _mcp_config(self.options.mcp_config)  # a bad config fails before the model loads
        self.mcp: Any = None
        self.model_name = model
        built: list = []

        def build() -> EngineCore:
            built.extend(build_core(model, self.options))
            return built[0]

        self.loop = EngineLoop.start(build)
        self.core, self.tokenizer, self.model_config = built
        self.generation_defaults = generation_defaults(self.model_config.generation_config)
        self.inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.generation_defaults,
                                     self.core.max_total_tokens, self.core.config.device)
        self.tool_parser, self.reasoning_parser = self._output_formats()
        self.media = self._media_input()
        try:
            if mcp_config is not None:
                from mistralpy.mcp import McpClient

                self.mcp = McpClient(mcp_config).start()  # each server connects (or fails) once first
            # Tools that run in this process during chat (engine/tool_rounds.py): MCP, dispatch URL, search
            self.server_tools = _server_tools(self.options, self.mcp)
        except BaseException:
            if self.mcp is not None:
                self.mcp.close()
            self.loop.shutdown()
            raise

    def _media_input(self) -> MediaInput | None:
        """The family's image processor for a vision model (multimodal/processors), else None."""
        from mistralpy.multimodal.processors import processor_for

        mc = self.model_config
        if not hasattr(self.core.runner.model, "embed_multimodal"):  # text-only (or its vision part not built yet)
            return None
        if mc.gguf_files and mc.hf_config.get("gguf_mmproj"):   # GGUF + mmproj: settings from the mmproj
            from mistralpy.loading.gguf_mmproj import gguf_llava_processor

            processor = gguf_llava_processor(mc.hf_config, self.tokenizer)
        else:
            processor = processor_for(mc.architecture, mc.path, mc.hf_config, self.tokenizer)
        if processor is None:
            return None
        return MediaInput(processor, self.options.max_num_images, max_edge=self.options.max_edge)

    def _output_formats(self) -> tuple[str | None, str | None]:
        """The model's tool-call and reasoning formats: configured, else detected from its template."""
        from mistralpy.tools import TOOL_PARSERS, detect_reasoning_parser, detect_tool_parser, get_reasoning_parser
        from mistralpy.tools.grammar import marker_token_ids

        self._marker_tokens = marker_token_ids(self.tokenizer)  # for grammars that force a tool call

        template = self.tokenizer.chat_template.source if self.tokenizer.chat_template is not None else None
        model_type = self.model_config.hf_config.get("model_type")
        tool = self.options.tool_parser or detect_tool_parser(template, model_type)
        if tool is not None and tool not in TOOL_PARSERS:
            raise InvalidRequestError(f"unknown tool parser {tool!r}; known: {', '.join(sorted(TOOL_PARSERS))}",
                                      "tool_parser")
        reasoning = self.options.reasoning_parser or detect_reasoning_parser(template, model_type)
        if reasoning is not None:
            get_reasoning_parser(reasoning)  # an unknown name is an error now, not at the first request
        return tool, reasoning

    # ---- text in, text out -------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def _prepare(self, prompt: Prompt | dict[str, Any], params: SamplingParams | None,
                 add_special_tokens: bool = True, images: Sequence[Any] | None = None) -> tuple[RequestTracker, list]:
        if isinstance(prompt, dict):  # {"prompt": text or ids, "images": [...], "videos": [...]} (vLLM: multi_modal_data)
            mm = prompt.get("multi_modal_data") or {}
            images = media_refs(prompt.get("images") or mm.get("image") or [],
                                prompt.get("videos") or mm.get("video") or [])
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
        self._check_generates()
        text, ids = self.inputs.encode(prompt, add_special_tokens)
        params = self.inputs.resolve_params(params)
        items: list = []
        if images:
            ids, items = self.expand_media(ids, images)
        # M-RoPE models (Qwen-VL): the prompt's (t, h, w) positions, once per request (text-only: sequential)
        mrope, delta = None, 0
        if items and hasattr(self.media.processor, "positions"):
            mrope, delta = self.media.processor.positions(ids, items)
        rid = new_request_id()
        reqs = self.inputs.make_requests(rid, ids, params)
        for req in reqs:
            req.mm_items = list(items)
            req.mrope_positions, req.mrope_delta = mrope, delta
        key = params.structured
        if key is not None:  # on the caller's thread: a grammar the matcher rejects is this caller's error
            for req in reqs:
                req.grammar = self.core.structured.matcher(key)
        return RequestTracker(rid, text, ids, params.n, params.logprobs), reqs

    def expand_media(self, ids: list[int], images: Sequence[Any]) -> tuple[list[int], list]:
        """The prompt ids with each media placeholder expanded as the model's processor does, and
        the media items (decoded and preprocessed); a MediaError for a text-only model."""
        if self.media is None:
            raise MediaError(f"{self.model_name} does not take images", "images")
        return self.media.items(ids, media_refs(images))

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt (a string or a list of token ids), in order."""
        if isinstance(prompts, (str, dict)) or is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError("need one SamplingParams per prompt", "sampling_params")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        prepared = [self._prepare(p, sp) for p, sp in zip(prompts, params_list)]  # validate all first
        collectors = []
        for tracker, reqs in prepared:
            collector = _Collector(tracker)
            self.loop.submit(reqs, collector)
            collectors.append(collector)
        try:
            for c in collectors:
                while not c.done.wait(0.5):
                    self._check_alive()
        except BaseException:
            self.loop.abort([r.request_id for _, reqs in prepared for r in reqs])
            raise
        return [c.tracker.snapshot() for c in collectors]

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                        add_special_tokens: bool = True) -> Iterator[RequestOutput]:
        """Yield a RequestOutput per new token holding only that choice's delta. Closing the
        iterator early aborts the request and frees its KV blocks."""
        tracker, reqs = self._prepare(prompt, sampling_params, add_special_tokens)
        return self._stream(tracker, reqs)

    def _stream(self, tracker: RequestTracker, reqs: list) -> Iterator[RequestOutput]:
        q: queue.Queue[SeqUpdate] = queue.Queue()
        self.loop.submit(reqs, q.put)
        try:
            while not tracker.finished:
                try:
                    update = q.get(timeout=0.5)
                except queue.Empty:
                    self._check_alive()
                    continue
                yield tracker.delta_output(tracker.apply(update))
        finally:
            if not tracker.finished:
                self.loop.abort([r.request_id for r in reqs])

    # ---- chat ----------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, Any]], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
                    enable_thinking: bool | None = None, images: list[Any] | None = None) -> str:
        """The prompt text; a media model's image parts are appended to ``images`` (refused when None)."""
        kwargs = dict(chat_template_kwargs or {})
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        return self.tokenizer.apply_chat_template(normalize_messages(messages, images), tools=tools,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def prepare_chat(self, messages: Sequence[dict[str, Any]], params: SamplingParams, *, tools: Any = None,
                     tool_choice: Any = None, add_generation_prompt: bool = True,
                     chat_template_kwargs: dict[str, Any] | None = None, enable_thinking: bool | None = None,
                     reasoning_effort: str | None = None,
                     parallel_tool_calls: bool = True) -> tuple[str, SamplingParams, ChatSpec]:
        """Render a chat request and resolve its tools / reasoning handling: (prompt text, sampling
        params with any tool-call grammar added, ChatSpec for parsing the output)."""
        self._check_generates()
        kwargs = dict(chat_template_kwargs or {})
        if reasoning_effort is not None:
            if reasoning_effort not in ("low", "medium", "high"):
                raise InvalidRequestError("reasoning_effort must be 'low', 'medium' or 'high'", "reasoning_effort")
            kwargs["reasoning_effort"] = reasoning_effort
        spec = chat_spec(tools=tools, tool_choice=tool_choice, tool_parser=self.tool_parser,
                         reasoning_parser=self.reasoning_parser, constrained=params.structured is not None,
                         special_tokens=self._marker_tokens, parallel_tool_calls=parallel_tool_calls)
        text = self.render_chat(messages, tools=spec.tools, add_generation_prompt=add_generation_prompt,
                                chat_template_kwargs=kwargs, enable_thinking=enable_thinking,
                                images=spec.images if self.media is not None else None)
        spec.note_prompt(text)
        if spec.grammar is not None:
            params = dataclasses.replace(params, grammar=spec.grammar)
        if not spec.plain and params.skip_special_tokens:
            # Call and reasoning markers may be special tokens ([TOOL_CALLS], <|python_tag|>): the
            # parsers must see them (they never reach the client as text).
            params = dataclasses.replace(params, skip_special_tokens=False)
        return text, params, spec

    def chat(self, messages: Sequence[dict[str, Any]], *, stream: bool = False, tools: list[dict] | None = None,
             tool_choice: Any = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None, enable_thinking: bool | None = None,
             reasoning_effort: str | None = None, sampling_params: SamplingParams | None = None,
             stream_options: dict[str, Any] | None = None, tool_callbacks: dict[str, Callable[..., Any]] | None = None,
             max_tool_rounds: int = 8, parallel_tool_calls: bool = True,
             **sampling: Any) -> OpenAIObject | Iterator[OpenAIObject]:
        """OpenAI-shaped chat completion; with stream=True an iterator of chat.completion.chunk objects.

        ``tools`` / ``tool_choice`` as in OpenAI's API; the output's tool calls are parsed into
        ``message.tool_calls``. ``tool_callbacks`` (name -> callable taking the arguments as keywords)
        runs tools here: each round's calls are executed, their results appended as ``tool``
        messages, and generation continues, up to ``max_tool_rounds`` rounds (see engine/tool_loop.py).
        The engine's server-side tools (``mcp_config``, ``tool_dispatch_url``, ``enable_search``) join
        ``tools`` and their calls run the same way; other tools still come back as ``tool_calls``.
        """
        params = sampling_from_kwargs(sampling, sampling_params)
        chat = dict(tools=tools, tool_choice=tool_choice, add_generation_prompt=add_generation_prompt,
                    chat_template_kwargs=chat_template_kwargs, enable_thinking=enable_thinking,
                    reasoning_effort=reasoning_effort, parallel_tool_calls=parallel_tool_calls)
        # server-side tools need one conversation to continue: n > 1 requests run without them
        server_tools = self.server_tools if params.n == 1 else None
        if tool_callbacks or server_tools:
            from mistralpy.engine.tool_loop import ToolLoop

            loop = ToolLoop(self, messages, params, chat, tool_callbacks or {}, max_tool_rounds, tools=server_tools)
            return loop.stream(stream_options) if stream else loop.run()
        return self._chat_once(messages, params, chat, stream, stream_options)

    def _chat_once(self, messages: Sequence[dict[str, Any]], params: SamplingParams, chat: dict[str, Any],
                   stream: bool, stream_options: dict[str, Any] | None,
                   chat_id: str | None = None) -> OpenAIObject | Iterator[OpenAIObject]:
        text, params, spec = self.prepare_chat(messages, params, **chat)
        chat_id, created = chat_id or oai.new_chat_id(), oai.now()
        tracker, reqs = self._prepare(text, params, add_special_tokens=False, images=spec.images)
        if stream:
            include_usage = bool((stream_options or {}).get("include_usage"))
            chunker = oai.ChatChunker(spec, model=self.model_name, chat_id=chat_id, created=created)
            return self._chat_chunks(tracker, self._stream(tracker, reqs), chunker, include_usage)
        start = time.perf_counter()
        collector = _Collector(tracker)
        self.loop.submit(reqs, collector)
        try:
            while not collector.done.wait(0.5):
                self._check_alive()
        except BaseException:
            self.loop.abort([r.request_id for r in reqs])
            raise
        return oai.chat_completion(tracker.snapshot(), model=self.model_name, chat_id=chat_id, created=created,
                                   elapsed_s=time.perf_counter() - start, spec=spec)

    def _chat_chunks(self, tracker: RequestTracker, deltas: Iterator[RequestOutput], chunker: oai.ChatChunker,
                     include_usage: bool) -> Iterator[OpenAIObject]:
        for out in deltas:
            yield from chunker.chunks(out.outputs[0])
        if include_usage:
            yield oai.usage_chunk(tracker.snapshot(), model=self.model_name, chat_id=chunker.chat_id,
                                  created=chunker.created)

    # ---- embeddings and scores (mistralpy/embed) ------------------------------------------------
    @property
    def embedder(self) -> Any:
        """The model's embedding / scoring setup (mistralpy.embed.engine.Embedder), built on first use."""
        emb = self.__dict__.get("_embedder")
        if emb is None:
            from mistralpy.embed.engine import Embedder

            emb = self.__dict__.setdefault("_embedder", Embedder(self))
        return emb

    def embed(self, inputs: Any, *, dimensions: int | None = None, truncate: bool | int = False,
              prompt_name: str | None = None, prompt: str | None = None) -> Any:
        """Embeddings [n, d] float32 (numpy) of a text, token ids or a list of either. ``truncate``:
        cut inputs longer than the model takes (True) or than a token count (an int); else they are
        an error. ``prompt_name`` / ``prompt``: the instruction prefix (sentence-transformers' prompts;
        the model's default prompt when neither is given). ``dimensions``: Matryoshka truncation."""
        from mistralpy.embed.engine import embed_plan

        plan = embed_plan(self.embedder, inputs, dimensions=dimensions, truncate=truncate,
                          prompt_name=prompt_name, prompt=prompt)
        return plan.finish(self.embedder.run(plan.reqs))

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], *,
              truncate: bool | int = False) -> list[float]:
        """Relevance scores of (text_1, text_2) pairs: a cross-encoder's, else embedding cosines."""
        from mistralpy.embed.engine import score_plan

        plan = score_plan(self.embedder, text_1, text_2, truncate)
        return plan.finish(self.embedder.run(plan.reqs))

    def _check_generates(self) -> None:
        if self.core.runner.encoder_only:
            raise InvalidRequestError(f"{self.model_name} is an embedding / scoring model and does not generate "
                                      "text: use embed() or score() (POST /v1/embeddings, /v1/score, /v1/rerank)",
                                      "model")

    # ---- lifecycle -----------------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        """Abort every choice of a request id returned in a RequestOutput."""
        self.loop.abort([request_id])

    def _check_alive(self) -> None:
        if self.loop.dead_error is not None:
            raise EngineDeadError(self.loop.dead_error)

    def shutdown(self) -> None:
        if self.mcp is not None:
            self.mcp.close()  # ends every server's task and child process
        self.loop.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
