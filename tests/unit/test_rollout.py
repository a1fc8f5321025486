"""The transformers rollout engine: token ids in and out, stop / truncation flags, behaviour log-probs, and
update_weights from a Megatron policy through the weight-sync gather."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.checkpoint.hf.gather import gather_hf_state
from megatron_save.data.chat import encode_prompt
from megatron_save.models.families import family_for
from megatron_save.rollout import SamplingSettings, TransformersRolloutEngine
from megatron_save.testing import save_tiny_hf_model


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    return save_tiny_hf_model("llama", root / "a", seed=1), save_tiny_hf_model("llama", root / "b", seed=2), root


def _prompts(engine):
    return [encode_prompt(engine.tokenizer, text) for text in ("hello", "a longer prompt here")]


def test_greedy_rollouts_match_transformers_generate(policies):
    a, _, _ = policies
    engine = TransformersRolloutEngine(a)
    prompts = _prompts(engine)
    rollouts = engine.generate(prompts, SamplingSettings(n=1, temperature=0.0, max_new_tokens=8))
    model = transformers.AutoModelForCausalLM.from_pretrained(a).eval()
    for prompt, (response,), (truncated,), (logprobs,) in zip(prompts, rollouts.response_ids, rollouts.truncated,
                                                             rollouts.logprobs):
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                                  eos_token_id=engine.tokenizer.eos_token_id, pad_token_id=0)[0, len(prompt):].tolist()
        assert response == expected[: len(response)] and 0 < len(response) <= 8
        assert truncated == (len(response) == 8 and response[-1] != engine.tokenizer.eos_token_id)
        assert len(logprobs) == len(response) and all(lp <= 1e-6 for lp in logprobs)


def test_sampling_groups_and_seed(policies):
    a, _, _ = policies
    engine = TransformersRolloutEngine(a)
    sampling = SamplingSettings(n=3, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=6, seed=5)
    first = engine.generate(_prompts(engine), sampling)
    assert [len(group) for group in first.response_ids] == [3, 3]
    assert engine.generate(_prompts(engine), sampling).response_ids == first.response_ids


def test_update_weights_from_a_megatron_policy(policies, world_of_one):
    a, b, root = policies
    convert_hf_to_megatron(b, root / "b_megatron")
    policy, meta, hf_config = build_model_from_checkpoint(root / "b_megatron")
    engine = TransformersRolloutEngine(a)
    engine.update_weights(gather_hf_state(policy, family_for(hf_config), hf_config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(b).state_dict()
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    with pytest.raises(KeyError, match="no tensor 'nonsense'"):
        engine.update_weights([("nonsense", torch.zeros(1))])


def test_update_weights_of_a_moe_policy_fills_the_stacked_experts(tiny_moe_models, tmp_path, world_of_one):
    """transformers holds a MoE layer's experts stacked; the stream names them one by one (as checkpoints do)."""
    other = save_tiny_hf_model("qwen3_moe", tmp_path / "other", seed=11)
    policy, _, hf_config = build_model_from_checkpoint(tiny_moe_models["qwen3_moe-lm"]["mg"])
    engine = TransformersRolloutEngine(other)
    assert "model.layers.0.mlp.experts.gate_up_proj" in engine.model.state_dict()
    engine.update_weights(gather_hf_state(policy, family_for(hf_config), hf_config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe_models["qwen3_moe-lm"]["hf"]).state_dict()
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    stream = dict(gather_hf_state(policy, family_for(hf_config), hf_config))
    stream.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    with pytest.raises(ValueError, match="no new value for model.layers.1.mlp.experts.3.up_proj.weight"):
        engine.update_weights(stream.items())


def test_checkpoint_generation_settings_do_not_leak_into_rollouts(policies, tmp_path):
    a, _, _ = policies
    engine = TransformersRolloutEngine(a)
    prompts = _prompts(engine)
    plain = engine.generate(prompts, SamplingSettings(temperature=0.0, max_new_tokens=8))
    model = transformers.AutoModelForCausalLM.from_pretrained(a)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    model.save_pretrained(tmp_path / "penalised")
    engine.tokenizer.save_pretrained(tmp_path / "penalised")
    penalised = TransformersRolloutEngine(tmp_path / "penalised").generate(
        prompts, SamplingSettings(temperature=0.0, max_new_tokens=8))
    assert penalised.response_ids == plain.response_ids and penalised.logprobs == plain.logprobs


def test_untruncated_sampling_logprobs_are_the_policy_logprobs(policies):
    """temperature 1, top-p 1, top-k 0: the behaviour log-probs are the model's own (no hidden top-k=50)."""
    a, _, _ = policies
    engine = TransformersRolloutEngine(a)
    prompts = _prompts(engine)
    rollouts = engine.generate(prompts, SamplingSettings(n=2, temperature=1.0, top_p=1.0, top_k=0,
                                                         max_new_tokens=5, seed=3))
    _assert_behaviour_logprobs(a, prompts, rollouts, top_k=0)


def _assert_behaviour_logprobs(model_dir, prompts, rollouts, top_k: int) -> None:
    """Every sampled token's behaviour log-prob is the model's own at temperature 1, cut to ``top_k`` when set
    (the sampled token then inside it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt, responses, logprobs in zip(prompts, rollouts.response_ids, rollouts.logprobs):
        for response, behaviour in zip(responses, logprobs):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
            table = _top_k_logprobs(logits, top_k) if top_k else torch.log_softmax(logits, dim=-1)
            expected = table.gather(-1, torch.tensor(response)[:, None])[:, 0]
            assert torch.isfinite(expected).all()
            assert torch.allclose(torch.tensor(behaviour), expected, atol=1e-4)


def test_megatron_engine_greedy_rollouts_match_the_transformers_engine(policies, world_of_one):
    from megatron_save.rollout.megatron_engine import MegatronRolloutEngine

    a, _, root = policies
    convert_hf_to_megatron(a, root / "a_megatron")
    policy, _, _ = build_model_from_checkpoint(root / "a_megatron")
    reference = TransformersRolloutEngine(a)
    engine = MegatronRolloutEngine(policy, reference.tokenizer, max_sequence_length=64, max_batch_size=4)
    prompts = _prompts(reference)
    greedy = SamplingSettings(n=2, temperature=0.0, max_new_tokens=10)
    expected = reference.generate(prompts, greedy)
    rollouts = engine.generate(prompts, greedy)
    assert rollouts.response_ids == expected.response_ids
    assert rollouts.truncated == expected.truncated

    sampled = SamplingSettings(n=3, temperature=1.0, top_k=20, max_new_tokens=10, seed=7)
    first = engine.generate(prompts, sampled)
    assert first.response_ids == engine.generate(prompts, sampled).response_ids  # seeded
    assert len({tuple(r) for r in first.response_ids[0]}) > 1  # a group holds different samples
    for group, flags in zip(first.response_ids, first.truncated):
        for response, truncated in zip(group, flags):
            stopped = response[-1] == reference.tokenizer.eos_token_id
            assert truncated == (not stopped) and (stopped or len(response) == 10)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_megatron_engine_behaviour_logprobs_are_the_sampling_distributions(temperature, top_k, policies,
                                                                           world_of_one):
    """Each sampled token's behaviour log-prob, EOS included, is the transformers model's own under the
    temperature, cut to top_k where set; at temperature 1 also megatron-core's own return_log_probs (which
    leaves the EOS out)."""
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.sampling_params import SamplingParams

    from megatron_save.rollout.megatron_engine import MegatronRolloutEngine

    a, _, root = policies
    if not (root / "a_megatron").exists():
        convert_hf_to_megatron(a, root / "a_megatron")
    policy, _, _ = build_model_from_checkpoint(root / "a_megatron")
    tokenizer = transformers.AutoTokenizer.from_pretrained(a)
    engine = MegatronRolloutEngine(policy, tokenizer, max_sequence_length=64, max_batch_size=4, return_logprobs=True)
    prompts = [encode_prompt(tokenizer, text) for text in ("hello", "a longer prompt here", "hi")]
    sampling = SamplingSettings(n=3, temperature=temperature, top_k=top_k, max_new_tokens=12, seed=11)
    rollouts = engine.generate(prompts, sampling)
    if top_k == 0:
        assert any(not t for flags in rollouts.truncated for t in flags)  # some responses stop at EOS
    model = transformers.AutoModelForCausalLM.from_pretrained(a).eval()
    for prompt, responses, logprobs in zip(prompts, rollouts.response_ids, rollouts.logprobs):
        for response, behaviour in zip(responses, logprobs):
            assert len(behaviour) == len(response)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1] / temperature
            table = _top_k_logprobs(logits, top_k) if top_k else torch.log_softmax(logits, dim=-1)
            expected = table.gather(-1, torch.tensor(response)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(behaviour), expected, atol=1e-4)
    if temperature == 1.0 and top_k == 0:
        # megatron-core's own log-probs of the same samples (the same seed draws the same tokens).
        params = SamplingParams(temperature=1.0, top_k=0, top_p=0.0, num_tokens_to_generate=12,
                                termination_id=tokenizer.eos_token_id, return_log_probs=True)
        engine.controller.sampling_rng.manual_seed(11)
        engine.engine.random_seed = 11
        rows = [p for p in prompts for _ in range(3)]
        requests = [InferenceRequest(request_id=str(i), prompt="", sampling_params=params, prompt_tokens=list(p))
                    for i, p in enumerate(rows)]
        with torch.random.fork_rng():
            done = engine.engine.generate(inference_requests=requests)
        flat = [(r, lp) for group, lps in zip(rollouts.response_ids, rollouts.logprobs) for r, lp in zip(group, lps)]
        for request, (response, behaviour) in zip(done, flat):
            assert request.generated_tokens.tolist()[: request.generated_length] == response[: request.generated_length]
            assert torch.allclose(torch.tensor(request.generated_log_probs[: request.generated_length]),
                                  torch.tensor(behaviour[: request.generated_length]), atol=1e-5)


def test_megatron_engine_refuses_sampling_it_cannot_honour():
    from megatron_save.rollout.megatron_engine import check_megatron_sampling

    with pytest.raises(ValueError, match="top_k=20, top_p=0.8"):
        check_megatron_sampling(SamplingSettings(top_k=20, top_p=0.8))
    with pytest.raises(ValueError, match="stop_token_ids"):
        check_megatron_sampling(SamplingSettings(stop_token_ids=[5]))


@pytest.fixture(scope="module")
def opinionated_policy(policies):
    """Policy ``a`` whose generation_config.json asks for its own sampling (top_k=20, temperature 0.5, top-p 0.5,
    a repetition penalty), as released checkpoints do: none of it may reach the rollouts."""
    a, _, root = policies
    model = transformers.AutoModelForCausalLM.from_pretrained(a)
    model.generation_config = transformers.GenerationConfig(
        do_sample=True, top_k=20, temperature=0.5, top_p=0.5, repetition_penalty=2.0, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)
    model.save_pretrained(root / "opinionated")
    transformers.AutoTokenizer.from_pretrained(a).save_pretrained(root / "opinionated")
    return root / "opinionated"


GENERATION_CASES = {
    "greedy": SamplingSettings(n=1, temperature=0.0, max_new_tokens=5),
    "no_top_k": SamplingSettings(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5, seed=3),
    "paper": SamplingSettings(n=2, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=5, seed=3),
}


@pytest.mark.parametrize("case", sorted(GENERATION_CASES))
def test_generation_emits_no_generation_flag_warning(case, opinionated_policy, caplog):
    # transformers warns through its own logger, which does not propagate, and only once per message a process:
    # listen on it directly and forget what earlier tests emitted.
    transformers.utils.logging.warning_once.cache_clear()
    library_logger = transformers.utils.logging.get_logger("transformers")
    library_logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = TransformersRolloutEngine(opinionated_policy)
            engine.generate(_prompts(engine), GENERATION_CASES[case])
    finally:
        library_logger.removeHandler(caplog.handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records
                                                   if r.levelno >= logging.WARNING]
    assert not [m for m in messages if "generation" in m.lower() or "top_k" in m], messages


def _top_k_logprobs(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Log-probs [T, V] of the distribution top-k sampling draws from (-inf outside each row's k best)."""
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_settings_are_honoured_over_the_checkpoints_generation_config(top_k, policies, opinionated_policy):
    """top_k=0 samples from every token although generation_config.json says top_k=20 (and temperature 0.5, ...);
    top_k=5 keeps 5: the behaviour log-probs are the model's own at temperature 1, cut to the asked top-k."""
    a, _, _ = policies
    engine = TransformersRolloutEngine(opinionated_policy)
    prompts = _prompts(engine)
    rollouts = engine.generate(prompts, SamplingSettings(n=4, temperature=1.0, top_p=1.0, top_k=top_k,
                                                         max_new_tokens=6, seed=11))
    _assert_behaviour_logprobs(a, prompts, rollouts, top_k)


def test_sampling_with_top_k_unset_means_every_token():
    from megatron_save.rollout.transformers_engine import generation_config_for

    config = generation_config_for(SamplingSettings(temperature=1.0, top_k=None), [2], 0, 1, True)
    assert config.do_sample and config.top_k == 0  # not transformers' default of 50
    greedy = generation_config_for(SamplingSettings(temperature=0.0, top_k=20), [2], 0, 1, True)
    assert not greedy.do_sample and greedy.top_k is None and greedy.temperature is None
