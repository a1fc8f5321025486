"""The rollout protocol every backend implements, and the typed hand-off it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class SamplingSettings:
    """How responses are sampled (paper Table 8: temperature 0.7, top-p 0.8, top-k 20, 1024 new tokens)."""

    n: int = 1
    """Responses per prompt (the group size G)."""
    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus mass (1 keeps every token)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 keeps every token)."""
    max_new_tokens: int = 1024
    """Longest response; a response that reaches it without a stop token is marked truncated."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a response besides the tokenizer's EOS."""
    seed: int | None = None
    """Seed of the sampler for reproducible rollouts."""

    @property
    def logit_temperature(self) -> float:
        """The temperature the trainer divides the policy's logits by, so that its log-probs are those of the
        distribution the responses were drawn from (1 for greedy decoding)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Rollouts:
    """G responses for each of B prompts, as token ids (never decoded and re-encoded)."""

    prompt_ids: list[list[int]]
    """[B] prompt token ids, ending with the generation prompt."""
    response_ids: list[list[list[int]]]
    """[B][G] response token ids, up to and including the stop token when there is one."""
    truncated: list[list[bool]]
    """[B][G] True when the response hit max_new_tokens without a stop token."""
    logprobs: list[list[list[float]]] | None = None
    """[B][G] behaviour log-probs of each response token under the sampling distribution, when available."""

    @classmethod
    def from_rows(cls, prompt_ids: list[list[int]], group_size: int, responses: list[list[int]],
                  truncated: list[bool], logprobs: list[list[float]] | None = None) -> "Rollouts":
        """Rollouts from flat per-sample lists, where sample i * G + j is response j of prompt i."""
        group = lambda items: [items[i : i + group_size] for i in range(0, len(items), group_size)]  # noqa: E731
        return cls([list(p) for p in prompt_ids], group(responses), group(truncated),
                   None if logprobs is None else group(logprobs))


class RolloutEngine(Protocol):
    """A backend that samples from the current policy."""

    collective: bool
    """Every rank of a model-parallel group calls ``generate`` (an engine sharded like the policy), rather than
    only the group's first rank."""
    shares_policy_weights: bool
    """The engine samples from the training policy's own parameters, so weight sync has nothing to do."""

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> Rollouts:
        """Samples ``sampling.n`` responses for every prompt."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads the policy's new weights, given as (HF name, full tensor) pairs."""
        ...


def check_weight_stream(incoming: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                        optional: set[str]) -> None:
    """Refuses new policy weights (HF name -> tensor) that do not fit the rollout model's ``expected`` shapes,
    before any is loaded: unknown names, wrong shapes, and missing names (except ``optional`` ones, such as an
    LM head tied to the embedding)."""
    unknown = sorted(set(incoming) - set(expected))
    if unknown:
        raise KeyError(f"update_weights: the rollout model has no tensor {unknown[0]!r}")
    for name, tensor in incoming.items():
        if expected[name] != tensor.shape:
            raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                             f"the rollout model expects {tuple(expected[name])}")
    missing = sorted(set(expected) - set(incoming) - optional)
    if missing:
        raise ValueError(f"update_weights: no new value for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


# transformers 5 holds a MoE layer's experts stacked in memory ([E, 2I, H] gate then up, and [E, H, I]) while
# checkpoints, and the weight stream, name them one by one (mlp.experts.<e>.gate_proj.weight ...).
_STACKED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def stack_expert_tensors(incoming: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """``incoming`` with each layer's per-expert tensors replaced by the stacked tensor of ``expected`` they make
    (``...mlp.experts.gate_up_proj`` [E, 2I, H] = per expert [gate; up], ``...mlp.experts.down_proj`` [E, H, I]);
    a stream of a dense model, or one already stacked, comes back as it is; one that lacks an expert is refused."""
    incoming = dict(incoming)
    for name, shape in expected.items():
        prefix, _, kind = name.rpartition(".")
        if not prefix.endswith("mlp.experts") or kind not in _STACKED_EXPERTS or name in incoming:
            continue
        parts = [[f"{prefix}.{expert}.{part}.weight" for part in _STACKED_EXPERTS[kind]] for expert in range(shape[0])]
        wanted = [n for names in parts for n in names]
        missing = [n for n in wanted if n not in incoming]
        if len(missing) == len(wanted):
            continue  # not a per-expert stream: check_weight_stream names what is missing
        if missing:
            raise ValueError(f"update_weights: no new value for {missing[0]} (a part of {name})")
        incoming[name] = torch.stack([torch.cat([incoming.pop(n) for n in names]) for names in parts])
    return incoming
