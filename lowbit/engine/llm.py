"""The user-facing API: `LLM(model).generate(prompts, SamplingParams(...))`, `chat`, `stream`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence as Seq

import torch

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.detokenizer import IncrementalDetokenizer, find_stop
from lowbit.engine.model_runner import ModelRunner, kv_bytes_per_block
from lowbit.engine.sampling_params import SamplingParams
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence
from lowbit.hub import resolve_model
from lowbit.models.loader import load_model

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop string or stop token) | "length"
    stop_reason: str | int | None = None  # the stop string or token that ended it


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__})")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r} is not supported; supported: cuda, cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


class LLM:
    """Loads a model and serves batched generation over a paged KV cache.

    model: local directory, hub id, or None for the embedded SmolLM2-135M-Instruct.
    backend: force one kernel backend for every quantized layer (as LOWBIT_BACKEND does).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.85,
        kv_cache_memory_gb: float | None = None,
        tokenizer: str | None = None,
        backend: str | None = None,
    ):
        from transformers import AutoTokenizer

        self.model_dir = resolve_model(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model, self.config = load_model(self.model_dir, self.device, self.dtype, backend)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.model_dir)
        limit = self.config.max_position_embeddings
        self.max_model_len = max_model_len or limit
        if self.max_model_len > limit and self.config.rope.type != "dynamic":
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        self.max_num_batched_tokens = max_num_batched_tokens or max(self.max_model_len, 2048)
        self.runner = ModelRunner(self.model, self.config, self.device, self.dtype, block_size)
        num_blocks = self._kv_blocks(block_size, max_num_seqs, gpu_memory_utilization, kv_cache_memory_gb)
        self.runner.allocate_kv_cache(num_blocks)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, self.max_num_batched_tokens)
        self.eos_ids = set(self.config.generation.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._detok: dict[int, IncrementalDetokenizer] = {}

    # ---- set-up ---------------------------------------------------------------------------------

    def _kv_blocks(self, block_size, max_num_seqs, utilization, kv_gb) -> int:
        per_block = kv_bytes_per_block(self.config, block_size, self.dtype)
        wanted = max_num_seqs * ((self.max_model_len + block_size - 1) // block_size)
        if kv_gb is not None:
            return max(1, min(wanted, int(kv_gb * 2**30 // per_block)))
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            peak = self.runner.profile_peak_memory(min(self.max_num_batched_tokens, 8192))
            budget = total * utilization - peak
            if budget < per_block:
                raise RuntimeError(
                    f"no GPU memory left for the KV cache: {peak / 2**30:.1f} GiB used of "
                    f"{total * utilization / 2**30:.1f} GiB allowed (gpu_memory_utilization={utilization})"
                )
            return max(1, min(wanted, int(budget // per_block)))
        return max(1, min(wanted, int(2 * 2**30 // per_block)))  # CPU: up to 2 GiB unless told

    # ---- requests -------------------------------------------------------------------------------

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        return None, list(prompt)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return SamplingParams.from_generation_config(self.config.generation, **overrides)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> Sequence:
        text, ids = self._encode(prompt)
        params = params or self.default_sampling_params()
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        seq = Sequence(ids, params, text)
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq)
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[tuple[Sequence, str]]:
        """Run one engine step; returns (sequence, new text) for every sequence that advanced."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        logits = self.runner.forward_logits(batch)
        suppress = [
            sorted(self.eos_ids | set(s.params.stop_token_ids)) if len(s.output_token_ids) < s.params.min_tokens else []
            for s in batch.seqs
        ]
        tokens = self.runner.sample(logits, batch.seqs, suppress)
        out = []
        for seq, n, tok in zip(batch.seqs, batch.query_lens, tokens):
            seq.num_computed_tokens += n
            seq.output_token_ids.append(tok)
            out.append((seq, self._postprocess(seq, tok)))
        return out

    def _postprocess(self, seq: Sequence, tok: int) -> str:
        p = seq.params
        delta = self._detok[seq.seq_id].step(seq)
        if delta:
            seq.output_text += delta
        if tok in p.stop_token_ids or (tok in self.eos_ids and not p.ignore_eos):
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif p.stop and delta:
            hit = find_stop(seq.output_text, len(delta), p.stop)
            if hit:
                i, stop = hit
                keep = i + len(stop) if p.include_stop_str_in_output else i
                delta = delta[: max(0, len(delta) - (len(seq.output_text) - keep))]
                seq.output_text = seq.output_text[:keep]
                seq.finish_reason, seq.stop_reason = "stop", stop
        if seq.finish_reason is None:
            if (p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            self.runner.forget(seq)
            self._detok.pop(seq.seq_id, None)
        return delta

    @staticmethod
    def _output(seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.prompt, seq.prompt_token_ids, seq.output_text, list(seq.output_token_ids),
                             seq.finish_reason, seq.stop_reason)

    # ---- public API -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, (list, tuple)):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, sampling_params)]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generating")
        while any(not s.is_finished for s in seqs):
            for seq, _ in self.step():
                if bar is not None and seq.is_finished:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [self._output(s) for s in seqs]

    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model_dir} has no chat template; use generate() with plain text")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several; each gets the next reply."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c, **template_kwargs) for c in convs], sampling_params)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text as it is generated for one prompt (other queued requests advance too)."""
        seq = self.add_request(prompt, sampling_params)
        while not seq.is_finished:
            for s, delta in self.step():
                if s is seq and delta:
                    yield delta
