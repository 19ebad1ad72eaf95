"""Per-request generation settings (the vLLM-style API)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lowbit.config import GenerationDefaults


@dataclass
class SamplingParams:
    max_tokens: int | None = 256  # None: up to the model's context length
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (or -1 for off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, gen: GenerationDefaults, **overrides) -> "SamplingParams":
        """The model's own defaults (generation_config.json): greedy unless it asks to sample."""
        base = cls(temperature=0.0)
        if gen.do_sample:
            base = replace(
                base,
                temperature=gen.temperature if gen.temperature is not None else 1.0,
                top_p=gen.top_p if gen.top_p is not None else 1.0,
                top_k=gen.top_k or 0,
            )
        if gen.repetition_penalty:
            base = replace(base, repetition_penalty=gen.repetition_penalty)
        return replace(base, **overrides)
