"""SAVE's RM-update loss over micro-batches of response groups adds up to the whole batch's eqs. 18-21."""

from __future__ import annotations

import pytest
import torch
from helpers import token_batch

from megatron_save.algorithms import save_partition, save_reward_loss, value_anchor_loss
from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.data.batching import ResponseGroupBatch
from megatron_save.models.forward import last_token_index
from megatron_save.testing import save_tiny_hf_model
from megatron_save.trainers.losses import save_rm_loss

PROMPTS, GROUP = 4, 3


def test_micro_batch_sums_make_the_global_means(tmp_path):
    hf_dir = save_tiny_hf_model("llama", tmp_path / "hf", reward_model=True, value_head=True, seed=4)
    convert_hf_to_megatron(hf_dir, tmp_path / "mg")
    model, _, _ = build_model_from_checkpoint(tmp_path / "mg")
    input_ids, mask = token_batch(batch=PROMPTS * GROUP, seq=12, seed=3)
    mask[:, :6] = True
    prompt_lengths = torch.full((PROMPTS * GROUP,), 4)
    valid = torch.ones(PROMPTS * GROUP, dtype=torch.bool)
    valid[-1] = False  # a filtered-out slot
    with torch.no_grad():
        scores = model(input_ids, torch.arange(12).expand_as(input_ids), None)
    rows = torch.arange(PROMPTS * GROUP)
    rewards = scores[rows, last_token_index(mask), 0].view(PROMPTS, GROUP)
    values = scores[rows, 3, 1].view(PROMPTS, GROUP)[:, 0]
    threshold = 0.5 + 1e-3
    pos, neg, keep = save_partition(rewards, values, valid.view(PROMPTS, GROUP), threshold)
    expected_reward = save_reward_loss(rewards, values, pos, neg, keep)
    expected_value = value_anchor_loss(values, rewards, valid.view(PROMPTS, GROUP))

    micro_batches, data_parallel = 2, 1
    batch = ResponseGroupBatch(input_ids, mask, prompt_lengths, valid, valid.clone(), GROUP, threshold,
                               sum_scale=micro_batches * data_parallel, value_scale=micro_batches * data_parallel / PROMPTS)
    parts = [save_rm_loss(part, scores[i * 6 : (i + 1) * 6], value_loss_weight=0.5)
             for i, part in enumerate(batch.split(GROUP * 2))]
    kept = sum(out["reward_count"] for _, out in parts)
    assert kept == keep.sum()  # each micro-batch partitions its own groups: together, the batch's partition
    reward_sum = sum(out["reward_loss_sum"] for _, out in parts)
    assert (reward_sum / kept).item() == pytest.approx(expected_reward.item(), rel=1e-5)
    assert torch.equal(torch.cat([out["rewards"] for _, out in parts]), rewards.flatten())
    assert torch.equal(torch.cat([out["values"] for _, out in parts]), values)
    # What Megatron's averaging makes of the losses: the reward sum (divided by |B~| after the pass) and the mean
    # value loss.
    total = sum(loss / micro_batches for loss, _ in parts)
    assert total.item() == pytest.approx(reward_sum.item() + 0.5 * expected_value.item(), rel=1e-5)


def _layer_backward_counter(model) -> list[int]:
    """A list whose one entry counts the gradients that reach a decoder layer's output during backward."""
    calls = [0]

    def count(grad):
        calls[0] += grad is not None

    def watch(_module, _args, output) -> None:
        output[0].register_hook(count)

    for layer in model.decoder.layers:
        layer.register_forward_hook(watch)
    return calls


def _scores(model, seed: int):
    input_ids, mask = token_batch(batch=PROMPTS * GROUP, seq=12, seed=seed)
    mask[:, :6] = True
    scores = model(input_ids, torch.arange(12).expand_as(input_ids), None)
    rewards = scores[torch.arange(PROMPTS * GROUP), last_token_index(mask), 0].view(PROMPTS, GROUP)
    return input_ids, mask, scores, rewards, scores[:, 3, 1].view(PROMPTS, GROUP)[:, 0]


def test_the_value_loss_gives_the_backbone_no_gradient_and_no_backward(tiny_models, world_of_one):
    """The value loss (eq. 21) alone trains the value head, leaves every other gradient exactly zero and runs no
    backward of the decoder layers (a hook counter on their outputs: 0 calls); the reward loss runs one per layer."""
    model, _, _ = build_model_from_checkpoint(tiny_models["llama-rmv"]["mg"])
    calls = _layer_backward_counter(model)
    _, _, _, rewards, values = _scores(model, seed=5)
    value_anchor_loss(values, rewards, torch.ones(PROMPTS, GROUP, dtype=torch.bool)).backward()
    assert calls == [0]
    for name, param in model.named_parameters():
        moved = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert moved == ("value_head" in name), name

    _, _, _, rewards, values = _scores(model, seed=5)
    rewards.sum().backward()
    assert calls == [len(model.decoder.layers)]


@pytest.mark.parametrize("threshold, layer_backwards", [(1.5, 0), (0.5, 1)], ids=["empty-B~", "kept"])
def test_a_micro_batch_without_kept_prompts_runs_no_backbone_backward(tiny_models, world_of_one, threshold,
                                                                     layer_backwards):
    """SAVE's fused loss on a micro-batch where nothing passes mu(t) (B~ empty: a value-only update) sends no work
    into the decoder layers' backward; with kept prompts it runs theirs once."""
    model, _, _ = build_model_from_checkpoint(tiny_models["llama-rmv"]["mg"])
    calls = _layer_backward_counter(model)
    input_ids, mask, scores, _, _ = _scores(model, seed=6)
    valid = torch.ones(PROMPTS * GROUP, dtype=torch.bool)
    batch = ResponseGroupBatch(input_ids, mask, torch.full((PROMPTS * GROUP,), 4), valid, valid.clone(), GROUP,
                               threshold, sum_scale=1.0, value_scale=1.0 / PROMPTS)
    loss, outputs = save_rm_loss(batch, scores, value_loss_weight=0.5)
    assert (outputs["reward_count"] > 0) == bool(layer_backwards)
    loss.backward()
    assert calls == [layer_backwards * len(model.decoder.layers)]
    assert model.output_layer.value_head.weight.grad.abs().sum() > 0


def test_the_joined_heads_give_the_gradients_of_a_plain_cat(tiny_models, world_of_one):
    """With a reward term, the heads' joined output (its reward column's graph run from a nested backward) gives
    every parameter the gradient that torch.cat's backward gives."""
    model, _, _ = build_model_from_checkpoint(tiny_models["llama-rmv"]["mg"])
    gradients = []
    for whole_model in (True, False):
        model.zero_grad()
        model.output_layer.whole_model = whole_model
        _, _, _, rewards, values = _scores(model, seed=7)
        (rewards.square().sum() + values.sum()).backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        assert torch.equal(grad, gradients[1][name]), name
