"""`lowbit run | chat` (and the commands later issues add).

  lowbit run  [-m MODEL] -p PROMPT [-p PROMPT ...]   answer prompts (chat template applied), streamed
  lowbit chat [-m MODEL]                             interactive conversation, streamed
  lowbit quantize | eval | inspect | matrix | serve  (see COMMANDS below)
Without -m, the embedded SmolLM2-135M-Instruct is used (converted once into the user's cache).
"""

from __future__ import annotations

import argparse
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="local model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size (default: from free memory)")
    p.add_argument("--backend", default=None, help="force one kernel backend for quantized layers (see `lowbit matrix`)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's generation_config, else greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")


def _build_llm(args):
    from lowbit import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
               kv_cache_memory_gb=args.kv_cache_gb, backend=args.backend)


def _sampling(llm, args):
    overrides = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return llm.default_sampling_params(**overrides)


def _prompt_ids(llm, args, history: list[dict]):
    if args.no_chat_template or not getattr(llm.tokenizer, "chat_template", None):
        return "\n".join(m["content"] for m in history)
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + history
    return llm.apply_chat_template(msgs)


def cmd_run(args) -> int:
    llm = _build_llm(args)
    params = _sampling(llm, args)
    prompts = [_prompt_ids(llm, args, [{"role": "user", "content": p}]) for p in args.prompt]
    if len(prompts) == 1:
        for delta in llm.stream(prompts[0], params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        print(f"### {prompt}\n{out.text}\n")
    return 0


def cmd_chat(args) -> int:
    llm = _build_llm(args)
    params = _sampling(llm, args)
    history: list[dict] = []
    print("lowbit chat: empty line or Ctrl-D to quit, /reset to clear the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for delta in llm.stream(_prompt_ids(llm, args, history), params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


# subcommands implemented in their own modules: name -> (module, help); each module has
# add_arguments(parser) and run(args) -> int, imported only when its command is used
COMMANDS = {
    "quantize": ("lowbit.quant.cli", "quantize a model (RTN, GPTQ, AWQ, W4A8-AWQ, FP8) and save it"),
    "eval": ("lowbit.eval.cli", "evaluate a model (perplexity)"),
    "inspect": ("lowbit.inspect", "describe a checkpoint: format, schemes per layer group, ignored modules"),
    "matrix": ("lowbit.matrix", "print the live support matrix (schemes x families x backends)"),
    "serve": ("lowbit.serve.cli", "OpenAI-compatible HTTP server"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="lowbit", description="Inference engine for quantized LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one or more prompts")
    _engine_args(run)
    _sampling_args(run)
    run.add_argument("-p", "--prompt", action="append", required=True, help="prompt (repeatable: batched)")
    run.set_defaults(func=cmd_run)
    chat = sub.add_parser("chat", help="interactive chat")
    _engine_args(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(func=lambda args, n=name: _not_yet(n))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def _not_yet(name: str) -> int:
    print(f"lowbit: `{name}` is not available in this build", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, NotImplementedError, RuntimeError, FileNotFoundError) as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
