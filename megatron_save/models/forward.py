"""Forward passes through Megatron-Core's pipeline schedules, and reading results off the last stage."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, gather_from_tensor_model_parallel_region

from megatron_save.data.token_budget import agreed_micro_batches, partition_by_tokens
from megatron_save.distributed.init import compute_device
from megatron_save.models.reward_model import SequenceScores, read_scores
from megatron_save.utils.tensors import pad_rows


def sequence_parallel_length(length: int, config: Any) -> int:
    """The sequence length a forward runs at: ``length`` rounded up to a multiple of TP under sequence
    parallelism (each tensor-parallel rank holds an equal slice of the sequence), else ``length``."""
    if not config.sequence_parallel:
        return length
    return -(-length // config.tensor_model_parallel_size) * config.tensor_model_parallel_size


def run_model(model: Any, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``model(tokens, position_ids)`` with causal attention over right-padded rows [b, S]; under sequence
    parallelism the rows are padded further to ``sequence_parallel_length`` and the last stage's output cut back
    to [b, S, ...] (real tokens never attend to the padding after them, so nothing else changes)."""
    length = tokens.shape[1]
    extra = sequence_parallel_length(length, model.config) - length
    if extra:
        tokens = F.pad(tokens, (0, extra))
        position_ids = torch.arange(length + extra, device=tokens.device).expand_as(tokens)
    output = model(tokens, position_ids, None)
    if extra and parallel_state.is_pipeline_last_stage():
        output = output[:, :length]
    return output


@contextmanager
def varying_lengths(config: Any, shapes: list[tuple[int, int]]) -> Iterator[None]:
    """For one pipeline-schedule call over micro-batches of these (rows, sequence length) ``shapes``: when they
    differ under pipeline parallelism, Megatron-Core's ``variable_seq_lengths`` (ModelParallelConfig: the stages'
    p2p then sends each activation's shape before it) instead of one (``seq_length``, ``micro_batch_size``) for
    every micro-batch; restored after. A no-op without PP or with one shape."""
    if len(set(shapes)) < 2 or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        yield
        return
    if not hasattr(config, "variable_seq_lengths"):
        raise RuntimeError("this megatron-core has no ModelParallelConfig.variable_seq_lengths: token-budget "
                           "micro-batches of different lengths cannot run under pipeline parallelism")
    previous = config.variable_seq_lengths
    config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = previous


def _forward_step(postprocess, data_iterator, model):
    tokens = next(data_iterator).to(compute_device())  # [b, S]
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    output = run_model(model, tokens, position_ids)
    if postprocess is None:
        return output, None
    return output, lambda output_tensor, non_loss_data=True: postprocess(tokens, output_tensor)


@torch.no_grad()
def pipeline_forward(
    model: Any,
    input_ids: torch.Tensor,
    micro_batch_size: int,
    postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Forward-only over ``input_ids`` [B, S] (right-padded) in micro-batches, through the pipeline schedule.

    Returns the model output [B, S, ...] on the last pipeline stage (vocab-sharded logits for a causal LM,
    scores for a reward model), or ``postprocess(tokens, output)`` of each micro-batch when given (so that, e.g.,
    full logits never pile up), concatenated; None on other stages. Every rank of a TP / PP group passes the
    same batch.
    """
    if input_ids.shape[0] % micro_batch_size != 0:
        raise ValueError(f"batch size {input_ids.shape[0]} is not a multiple of micro_batch_size={micro_batch_size}")
    outputs = forward_micro_batches(model, list(input_ids.split(micro_batch_size)), postprocess)
    return None if outputs is None else torch.cat(outputs, dim=0)


@torch.no_grad()
def forward_micro_batches(
    model: Any,
    micro_batches: list[torch.Tensor],
    postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """Forward-only over right-padded micro-batches [b_i, S_i] (rows and lengths may differ: token-budget
    micro-batches) through the pipeline schedule. Returns each micro-batch's output [b_i, S_i, ...] (or
    ``postprocess(tokens, output)``) on the last pipeline stage, None on other stages."""
    model.eval()
    lengths = [sequence_parallel_length(m.shape[1], model.config) for m in micro_batches]
    with varying_lengths(model.config, [(m.shape[0], n) for m, n in zip(micro_batches, lengths)]):
        outputs = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, postprocess),
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=max(lengths),
            micro_batch_size=max(m.shape[0] for m in micro_batches),
            forward_only=True,
            collect_non_loss_data=postprocess is not None,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return list(outputs)


def gather_vocab_logits(sharded_logits: torch.Tensor) -> torch.Tensor:
    """[..., V / TP] vocab-parallel logits -> [..., V] on every tensor-parallel rank."""
    return gather_from_tensor_model_parallel_region(sharded_logits)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] right-padded mask of real tokens -> [B] index of each row's last real token."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def at_last_token(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token head outputs [B, S, heads] -> [B, heads] at each row's last real token."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, last_token_index(attention_mask).to(scores.device)]


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Sends a last-stage tensor to every stage of this rank's pipeline group (a no-op without PP)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=compute_device())
    tensor = tensor.contiguous()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(tensor, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def score_sequences(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    micro_batch_size: int,
    prompt_lengths: torch.Tensor | None = None,
) -> SequenceScores:
    """R (at each sequence's last real token) and, given ``prompt_lengths``, V (at its last prompt token) from
    ONE forward, on every rank. input_ids / attention_mask [N, S] right-padded, prompt_lengths [N]."""
    if prompt_lengths is not None and not model.has_value_head:
        raise ValueError("prompt_lengths given, but the reward model has no value head")
    scores = pipeline_forward(model, input_ids, micro_batch_size)  # [N, S, heads] on the last stage
    heads = 1 if prompt_lengths is None else 2
    read = None
    if scores is not None:
        if prompt_lengths is None:
            read = at_last_token(scores, attention_mask)[:, :1]  # [N, 1]
        else:
            last = last_token_index(attention_mask).to(scores.device)
            read = torch.stack(read_scores(scores, last, (prompt_lengths - 1).to(scores.device)), dim=1)  # [N, 2]
    read = broadcast_from_last_stage(read, (input_ids.shape[0], heads), torch.float32)
    return SequenceScores(rewards=read[:, 0], values=None if prompt_lengths is None else read[:, 1])


def score_token_sequences(
    model: Any,
    sequences: list[list[int]],
    pad_id: int,
    micro_batch_size: int,
    prompt_lengths: list[int] | None = None,
    description: str | None = "scoring",
    max_tokens: int = 0,
    budget_setting: str = "max_tokens_per_micro_batch",
) -> SequenceScores:
    """Scores many token sequences once each, on every rank, spreading the work over data-parallel ranks.

    ``max_tokens`` > 0: token-budget micro-batches instead (``_score_by_tokens``; ``budget_setting`` names the
    setting in errors).

    Sequences are sorted by length (little padding) and cut into chunks of ``micro_batch_size`` x (pipeline
    size) rows, so a pipeline always has micro-batches in flight; chunk k goes to data-parallel rank k mod DP and
    the results are gathered. ``prompt_lengths`` (one per sequence) adds V at each prompt's last token.
    ``description`` labels the progress bar (None: no bar, for callers that show their own).
    """
    from tqdm import tqdm

    if max_tokens:
        return _score_by_tokens(model, sequences, pad_id, prompt_lengths, max_tokens, budget_setting)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunk_size = micro_batch_size * parallel_state.get_pipeline_model_parallel_world_size()
    chunks = [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine: dict[int, tuple[float, float | None]] = {}
    with tqdm(total=len(sequences), desc=description, unit="seq", disable=dist.get_rank() != 0 or description is None,
              dynamic_ncols=True) as bar:
        for chunk in chunks[rank::ranks]:
            # A short last chunk is filled up with copies of its first row (results dropped): micro-batches keep
            # their size instead of one oversized micro-batch of the longest sequences.
            rows = chunk + [chunk[0]] * (-len(chunk) % micro_batch_size)
            input_ids, mask = pad_rows([sequences[i] for i in rows], pad_id)
            lengths = None if prompt_lengths is None else torch.tensor([prompt_lengths[i] for i in rows])
            scores = score_sequences(model, input_ids, mask, micro_batch_size, lengths)
            values = [None] * len(rows) if scores.values is None else scores.values.tolist()
            mine.update(zip(chunk, zip(scores.rewards.tolist()[: len(chunk)], values[: len(chunk)])))
            bar.update(len(chunk) * ranks)
    gathered: list[dict] = [{} for _ in range(ranks)]
    dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    everything = {index: pair for part in gathered for index, pair in part.items()}
    rewards = torch.tensor([everything[i][0] for i in range(len(sequences))])
    values = None if prompt_lengths is None else torch.tensor([everything[i][1] for i in range(len(sequences))])
    return SequenceScores(rewards=rewards, values=values)


def _score_by_tokens(model: Any, sequences: list[list[int]], pad_id: int, prompt_lengths: list[int] | None,
                     budget: int, setting: str) -> SequenceScores:
    """``score_token_sequences`` in token-budget micro-batches: data-parallel rank r scores the length-sorted
    sequences r, r + DP, ... (every rank about the same tokens), cut by ``partition_by_tokens`` into the same
    number of micro-batches on every rank (an empty one scores a copy of the shortest sequence, dropped), each
    padded to its own longest row; results gathered on every rank."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    shares = [order[r::ranks] for r in range(ranks)]
    count = agreed_micro_batches([[len(sequences[i]) for i in share] for share in shares], budget, setting)
    mine = shares[rank]
    parts = [[mine[k] for k in part] for part in partition_by_tokens([len(sequences[i]) for i in mine], budget,
                                                                      count, setting)]
    fillers = {k for k, part in enumerate(parts) if not part}
    parts = [part or [order[0]] for part in parts]
    batches = [pad_rows([sequences[i] for i in part], pad_id) for part in parts]
    outputs = forward_micro_batches(model, [ids for ids, _ in batches], postprocess=lambda tokens, output: output)
    heads = 1 if prompt_lengths is None else 2
    rows = sum(len(part) for part in parts)
    read = None
    if outputs is not None:
        pieces = []
        for part, (_, mask), scores in zip(parts, batches, outputs):
            last = last_token_index(mask).to(scores.device)
            if prompt_lengths is None:
                pieces.append(at_last_token(scores, mask)[:, :1])
            else:
                first = torch.tensor([prompt_lengths[i] - 1 for i in part], device=scores.device)
                pieces.append(torch.stack(read_scores(scores, last, first), dim=1))
        read = torch.cat(pieces).float()
    read = broadcast_from_last_stage(read, (rows, heads), torch.float32).cpu()
    results, position = {}, 0
    for k, part in enumerate(parts):
        if k not in fillers:
            results.update({i: read[position + j].tolist() for j, i in enumerate(part)})
        position += len(part)
    gathered: list[dict] = [{} for _ in range(ranks)]
    dist.all_gather_object(gathered, results, group=parallel_state.get_data_parallel_group())
    everything = {index: pair for part in gathered for index, pair in part.items()}
    scores = torch.tensor([everything[i] for i in range(len(sequences))])  # [N, heads]
    return SequenceScores(rewards=scores[:, 0], values=None if prompt_lengths is None else scores[:, 1])


def final_hidden_states(model: Any, input_ids: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Last-layer hidden states (after the final norm: what the output layer reads) of right-padded sequences
    [N, S], as [N, S, H] fp32 on every rank (forward only). Read with a pre-hook on the last stage's output
    layer; the output layer's own result is dropped right away (never a full vocabulary of logits)."""
    captured: list[torch.Tensor] = []
    handle = None
    length = input_ids.shape[1]

    def capture(_, args):
        hidden = args[0].detach()  # [S, b, H]; [S / TP, b, H] under sequence parallelism
        if model.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        captured.append(hidden[:length].float().transpose(0, 1))  # [b, S, H]

    if model.post_process:
        handle = model.output_layer.register_forward_pre_hook(capture)
    try:
        pipeline_forward(model, input_ids, micro_batch_size, postprocess=lambda tokens, output: tokens[:, :1])
    finally:
        if handle is not None:
            handle.remove()
    hidden = torch.cat(captured) if captured else None
    return broadcast_from_last_stage(hidden, (*input_ids.shape, model.config.hidden_size), torch.float32)
