"""One request's next token from its row of logits: OpenAI's penalties and ``logit_bias``, vLLM's
``min_tokens`` and ``ignore_eos``, then ``generate.sample_next`` (greedy below a temperature floor,
finite probabilities by construction), and the log-probabilities ``logprobs`` asks for.

Log-probabilities are those of the model's own distribution (the raw logits' log-softmax, before
penalties, bias and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moevlm.generate import GREEDY_BELOW, sample_next


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy_plain(self) -> bool:
        """The batch's argmax is this request's token: nothing changes the logits or is reported."""
        return (self.temperature < GREEDY_BELOW and not self.logit_bias and not self.logprobs
                and not self.presence_penalty and not self.frequency_penalty
                and not self.min_tokens and not self.ignore_eos)


def adjusted(logits: torch.Tensor, params: SamplingParams, generated: list[int], eos_id: int) -> torch.Tensor:
    """logits (V,) with the penalties, the bias and the eos ban applied (a new tensor, float32).

    OpenAI's definitions: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``
    over the tokens generated so far; ``logit_bias`` adds to the given token ids."""
    logits = logits.float().clone()
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.size(0))
        counts = counts[:logits.size(0)].float()
        logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    if params.ignore_eos or len(generated) < params.min_tokens:
        logits[eos_id] = float("-inf")
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, generated: list[int], eos_id: int,
         generator: torch.Generator | None) -> int:
    """The next token of one request from its raw logits (V,)."""
    row = adjusted(logits, params, generated, eos_id)[None]
    return int(sample_next(row, params.temperature, None, params.top_p, generator)[0])


def logprob_details(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the raw logits (V,), and the ``top`` most likely
    (token id, log-probability), most likely first."""
    logprobs = logits.float().log_softmax(dim=-1)
    values, ids = logprobs.topk(min(top, logprobs.size(0))) if top else (logprobs[:0], logprobs[:0].long())
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))
