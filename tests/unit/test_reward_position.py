"""Rewards are read where transformers reads them: at a sequence's last token that is not the config's pad token.

With pad = EOS (what ``--as-reward-model`` falls back to, and what many released reward models use) a sequence
ending in EOS, as every RL response and every chat-template conversation does, is read at the token before its
trailing EOS. Checked for a converted reward model whose pad is EOS and for one made by ``--as-reward-model``, in
every place that reads a reward: scoring (stages 2 and 3, evaluation), the stage 1 and stage 3 losses, the parity
report behind ``tools/check_parity.py``, and the exported model. Each comparison would fail by far were the
reward read one token off (asserted next to it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from megatron_save.algorithms import bt_loss
from megatron_save.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf, reward_model_config
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR, build_model_from_checkpoint
from megatron_save.checkpoint.parity import chat_sequences, classifier_rewards, parity_batch, parity_report
from megatron_save.data.batching import PairBatch, ResponseGroupBatch, pad_id_of
from megatron_save.evaluation.scorer import hf_sequence_scorer, megatron_sequence_scorer, score_conversations
from megatron_save.models.families import LLAMA
from megatron_save.models.forward import run_model, score_token_sequences
from megatron_save.models.reward_model import reward_positions
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testing.tiny_models import tiny_hf_config, tiny_tokenizer
from megatron_save.trainers.losses import bt_pair_loss, save_rm_loss
from megatron_save.utils.tensors import pad_rows

EOS_ID, PAD_ID = 2, 0
REWARD_ATOL = 2e-5
"""Megatron vs transformers rewards in fp32: measured at most 2.4e-6 (AMD EPYC, 2 threads) on rewards up to 3.6,
from summation order over up to ~130 tokens and 4 layers; 2e-5 leaves 8x for other CPUs and thread counts.
Reading one token off moved these rewards by 0.5 to 2.5 (asserted: > 100 x this tolerance)."""


def _transformers_transcription(input_ids: torch.Tensor, pad: int) -> torch.Tensor:
    """transformers' GenericForSequenceClassification, word for word: the rightmost token that is not pad."""
    non_pad_mask = (input_ids != pad).to(torch.int32)
    token_indices = torch.arange(input_ids.shape[-1], dtype=torch.int32)
    return (token_indices * non_pad_mask).argmax(-1)


def test_reward_positions_are_transformers_rule_for_every_prefix():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 4, (64, 10), generator=generator)  # pad (0) and EOS (2) are frequent
    input_ids[0] = 0  # all pad: transformers reads position 0
    positions = reward_positions(input_ids, PAD_ID)  # [B, S]
    for end in range(1, input_ids.shape[1] + 1):
        assert torch.equal(positions[:, end - 1], _transformers_transcription(input_ids[:, :end], PAD_ID)), end
    assert torch.equal(reward_positions(input_ids, None), torch.arange(10).expand(64, 10))


def test_as_reward_model_pad_token_choice():
    """The LM's own pad token, else the tokenizer's, else EOS (the first of several)."""
    with_pad = tiny_hf_config("llama")
    assert reward_model_config(LLAMA, with_pad, tokenizer_pad_id=5).pad_token_id == PAD_ID
    without = tiny_hf_config("llama", pad_token_id=None)
    assert reward_model_config(LLAMA, without, tokenizer_pad_id=5).pad_token_id == 5
    assert reward_model_config(LLAMA, without).pad_token_id == EOS_ID
    several = tiny_hf_config("llama", pad_token_id=None, eos_token_id=[7, EOS_ID])
    assert reward_model_config(LLAMA, several).pad_token_id == 7


def _sequences() -> list[list[int]]:
    """Conversations rendered with the chat template (each turn, so each sequence, ends in EOS), one with two
    trailing EOS, one cut before its EOS, one of a single token."""
    tokenizer = tiny_tokenizer()
    conversations = chat_sequences(tokenizer)
    assert all(sequence[-1] == EOS_ID for sequence in conversations)
    return conversations[:4] + [conversations[4] + [EOS_ID], conversations[5][:-1], [5]]


def _transformers_rewards(hf_dir: Path, sequences: list[list[int]]) -> torch.Tensor:
    """[N] each sequence scored alone by transformers (batch of one, no padding)."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([s])).logits[:, 0] for s in sequences])


def _rewards_at_the_last_token(hf_dir: Path, sequences: list[list[int]]) -> torch.Tensor:
    """[N] the reward read one token off where a sequence ends in EOS: at its very last token."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model.score(model.base_model(input_ids=torch.tensor([s])).last_hidden_state)[:, -1, 0]
                          for s in sequences])


@pytest.fixture(scope="module")
def pad_is_eos_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Reward models whose pad token is EOS: "converted", a transformers classifier with pad_token_id = EOS and
    a value head; "as_reward_model", made of a causal LM whose config and tokenizer have no pad token. Each
    with its Megatron checkpoint ("mg") and that checkpoint exported ("export")."""
    from megatron_save.config import ParallelConfig
    from megatron_save.distributed import init_distributed

    init_distributed(ParallelConfig())
    root = tmp_path_factory.mktemp("pad_is_eos")
    converted = save_tiny_hf_model("llama", root / "rm-hf", reward_model=True, seed=11, value_head=True,
                                   pad_token_id=EOS_ID)
    convert_hf_to_megatron(converted, root / "rm-mg")
    lm = save_tiny_hf_model("qwen2", root / "lm-hf", seed=12, pad_token_id=None)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None  # as Llama 3's: no pad token in the config or the tokenizer
    tokenizer.save_pretrained(lm)
    convert_hf_to_megatron(lm, root / "asrm-mg", as_reward_model=True, reward_head_std=0.5, seed=3)
    models = {"converted": {"hf": converted, "mg": root / "rm-mg"},
              "as_reward_model": {"mg": root / "asrm-mg"}}
    for name, paths in models.items():
        paths["export"] = convert_megatron_to_hf(paths["mg"], root / f"{name}-export")
    return models


@pytest.mark.parametrize("kind", ["converted", "as_reward_model"])
def test_pad_is_eos_survives_conversion_and_export(pad_is_eos_models, kind, world_of_one):
    paths = pad_is_eos_models[kind]
    model, _, _ = build_model_from_checkpoint(paths["mg"])
    assert model.pad_token_id == EOS_ID
    assert transformers.AutoConfig.from_pretrained(paths["export"]).pad_token_id == EOS_ID


@pytest.mark.parametrize("kind", ["converted", "as_reward_model"])
def test_scoring_reads_rewards_as_transformers(pad_is_eos_models, kind, world_of_one):
    """score_token_sequences (stage 2's targets, stage 3's scores, evaluation) against transformers, each sequence
    alone, on the export and (for the converted model) on the original."""
    paths = pad_is_eos_models[kind]
    sequences = _sequences()
    model, _, _ = build_model_from_checkpoint(paths["mg"])
    ours = score_token_sequences(model, sequences, PAD_ID, micro_batch_size=2, description=None).rewards
    for reference_dir in (paths["export"], paths.get("hf", paths["export"])):
        reference = _transformers_rewards(reference_dir, sequences)
        assert (ours - reference).abs().max().item() < REWARD_ATOL
    one_off = _rewards_at_the_last_token(paths["export"], sequences)
    ends_in_eos = torch.tensor([s[-1] == EOS_ID for s in sequences])
    assert (one_off - reference).abs()[ends_in_eos].min().item() > 100 * REWARD_ATOL
    assert torch.equal(one_off[~ends_in_eos], reference[~ends_in_eos])


def test_value_read_alongside_the_reward(pad_is_eos_models, world_of_one):
    """With prompt lengths the same forward also gives V at the last prompt token; R is still transformers'."""
    paths = pad_is_eos_models["converted"]
    sequences = _sequences()[:4]
    model, _, _ = build_model_from_checkpoint(paths["mg"])
    scores = score_token_sequences(model, sequences, PAD_ID, 2, [len(s) // 2 for s in sequences], description=None)
    assert (scores.rewards - _transformers_rewards(paths["export"], sequences)).abs().max().item() < REWARD_ATOL


@pytest.mark.parametrize("kind", ["converted", "as_reward_model"])
def test_classifier_rewards_fill_padding_with_the_pad_token(pad_is_eos_models, kind):
    """parity's reference: a right-padded batch scored as transformers scores each sequence alone, whatever id
    the batch was padded with."""
    paths = pad_is_eos_models[kind]
    sequences = _sequences()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(paths["export"], dtype=torch.float32)
    for filler in (PAD_ID, EOS_ID, 7):
        input_ids, mask = pad_rows(sequences, filler)
        rewards = classifier_rewards(model.eval(), input_ids, mask)
        assert (rewards - _transformers_rewards(paths["export"], sequences)).abs().max().item() < REWARD_ATOL


def test_evaluation_scorers_agree(pad_is_eos_models, world_of_one):
    """Evaluation: our checkpoint (Megatron) and its export (transformers, batched) score the same
    conversations alike."""
    paths = pad_is_eos_models["converted"]
    tokenizer = tiny_tokenizer()
    conversations = [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": answer}]
                     for answer in ("Blue.", "Red, like a rose.", "Green", "I would say a deep purple.")]
    megatron_score, _ = megatron_sequence_scorer(paths["mg"], batch_size=2)
    hf_score, _ = hf_sequence_scorer(paths["export"], batch_size=3, device="cpu")
    ours = torch.tensor(score_conversations(conversations, tokenizer, megatron_score, 256))
    reference = torch.tensor(score_conversations(conversations, tokenizer, hf_score, 256))
    assert (ours - reference).abs().max().item() < REWARD_ATOL
    alone = _transformers_rewards(paths["export"], [chat_sequences(tokenizer, tuple(conversations))[i]
                                                    for i in range(len(conversations))])
    assert (reference - alone).abs().max().item() < REWARD_ATOL


@pytest.mark.parametrize("kind", ["converted", "as_reward_model"])
def test_parity_report_on_sequences_ending_in_eos(pad_is_eos_models, kind, world_of_one):
    """check_parity's comparison on its default input (the chat sample, every conversation ending in EOS)."""
    paths = pad_is_eos_models[kind]
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(paths["mg"]) / HF_SUBDIR)
    batch = parity_batch(chat_sequences(tokenizer), pad_id_of(tokenizer), max_length=256)
    report = parity_report(paths["mg"], paths["export"], batch)
    assert report.max_abs_diff < REWARD_ATOL, report
    if report.value_max_abs_diff is not None:
        assert report.value_max_abs_diff < REWARD_ATOL, report


def _scores(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token head outputs [B, S, heads] of a training forward (what the losses read)."""
    with torch.no_grad():
        return run_model(model, input_ids, torch.arange(input_ids.shape[1]).expand_as(input_ids))


def test_stage1_loss_reads_rewards_as_transformers(pad_is_eos_models, world_of_one):
    """Stage 1's Bradley-Terry loss on pairs that end in EOS equals the loss of transformers' rewards."""
    paths = pad_is_eos_models["converted"]
    sequences = _sequences()[:6]  # pairs (0, 1), (2, 3), (4, 5): row 2i chosen, 2i + 1 rejected
    model, _, _ = build_model_from_checkpoint(paths["mg"])
    batch = PairBatch(*pad_rows(sequences, PAD_ID))
    loss, _ = bt_pair_loss(batch, _scores(model, batch.input_ids))
    reference = _transformers_rewards(paths["export"], sequences)
    expected = bt_loss(reference[0::2], reference[1::2])
    assert abs(loss.item() - expected.item()) < REWARD_ATOL
    one_off = _rewards_at_the_last_token(paths["export"], sequences)
    assert abs(bt_loss(one_off[0::2], one_off[1::2]).item() - expected.item()) > 100 * REWARD_ATOL


@pytest.mark.parametrize("kind", ["converted", "as_reward_model"])
def test_stage3_loss_reads_rewards_as_transformers(pad_is_eos_models, kind, world_of_one):
    """Stage 3's reward-model update (SAVE's loss) scores responses that end in EOS as transformers does."""
    paths = pad_is_eos_models[kind]
    sequences = _sequences()[:4]  # two prompts, two response slots each
    model, _, _ = build_model_from_checkpoint(paths["mg"])
    input_ids, mask = pad_rows(sequences, PAD_ID)
    rows = len(sequences)
    batch = ResponseGroupBatch(input_ids, mask, prompt_lengths=torch.tensor([len(s) // 2 for s in sequences]),
                               valid=torch.ones(rows, dtype=torch.bool), trained=torch.ones(rows, dtype=torch.bool),
                               group_size=2, threshold=0.5, sum_scale=1.0, value_scale=1.0)
    _, outputs = save_rm_loss(batch, _scores(model, input_ids))
    reference = _transformers_rewards(paths["export"], sequences)
    assert (outputs["rewards"] - reference).abs().max().item() < REWARD_ATOL


def test_a_reward_read_at_the_last_token_fails_these_checks(pad_is_eos_models, world_of_one):
    """The rule has teeth: the same Megatron model told it has no pad token (so it reads the very last token)
    misses transformers' rewards of sequences ending in EOS by far."""
    paths = pad_is_eos_models["converted"]
    sequences = _sequences()
    model, _, _ = build_model_from_checkpoint(paths["mg"])
    model.pad_token_id = None
    ours = score_token_sequences(model, sequences, PAD_ID, micro_batch_size=2, description=None).rewards
    reference = _transformers_rewards(paths["export"], sequences)
    ends_in_eos = torch.tensor([s[-1] == EOS_ID for s in sequences])
    assert (ours - reference).abs()[ends_in_eos].min().item() > 100 * REWARD_ATOL


@pytest.mark.parametrize("kind", ["converted", "as_reward_model"])
def test_r2m_reads_the_reward_models_state_where_its_reward_is_read(pad_is_eos_models, kind, world_of_one):
    """R2M fuses the frozen RM's state at its reward position: that state through the reward head is the RM's own
    reward (so R2M's head, which starts as the reward head, starts from the RM's reading of the sequence)."""
    from megatron_save.trainers.stage3.r2m import reward_states

    sequences = _sequences()
    model, _, _ = build_model_from_checkpoint(pad_is_eos_models[kind]["mg"])
    states = reward_states(model, sequences, PAD_ID, micro_batch_size=2)  # [N, H]
    rewards = score_token_sequences(model, sequences, PAD_ID, micro_batch_size=2, description=None).rewards
    through_head = (states @ model.output_layer.reward_head.weight.detach().float().T)[:, 0]
    assert (through_head - rewards).abs().max().item() < REWARD_ATOL
