"""Model evaluation: perplexity over a text with a sliding window (`lowbit eval ppl`)."""

from lowbit.eval.ppl import PplResult, hf_logits_fn, lowbit_logits_fn, perplexity

__all__ = ["PplResult", "perplexity", "lowbit_logits_fn", "hf_logits_fn"]
