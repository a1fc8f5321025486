"""The testbed's Megatron work outside the trainers, under torchrun (any TP / PP): sampling from a policy
checkpoint with Megatron-Core's inference engine, labelling by the gold reward, and scoring with reward models.

    torchrun ... -m megatron_save testbed-eval collect  --policy CKPT --data-dir DIR --seed S ...
    torchrun ... -m megatron_save testbed-eval evaluate --policy-init CKPT --proxy-rm CKPT --data-dir DIR RUN...

``collect`` samples the initial (SFT) policy for the proxy RM's gold-labelled pairs (stage 1), the response
groups of stage 2, and held-out pairs for evaluation. ``evaluate`` measures each stage-3 run against gold: RM
pairwise accuracy on held-out pairs from the initial and from the run's final policy, the final policy's gold
reward, and the proxy RM's score of every logged rollout (for the over-optimisation curve).
"""

from __future__ import annotations

import argparse
import functools
import random
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoTokenizer

from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR, build_model_from_checkpoint, read_checkpoint_meta
from megatron_save.config import ParallelConfig
from megatron_save.data.batching import pad_id_of
from megatron_save.data.chat import conversation, encode_conversation, encode_prompt
from megatron_save.distributed import ParallelLayoutError, init_distributed, shutdown_distributed
from megatron_save.models.forward import score_token_sequences
from megatron_save.models.gpt_config import model_shape
from megatron_save.rollout import SamplingSettings
from megatron_save.rollout.distributed import generate_data_parallel
from megatron_save.rollout.megatron_engine import MegatronRolloutEngine
from megatron_save.testbed.data import read_jsonl
from megatron_save.testbed.report import prompt_text
from megatron_save.testbed.task import gold_pair, gold_reward, overlong_pair
from megatron_save.testing.synthetic import write_jsonl
from megatron_save.trainers.common import write_json
from megatron_save.utils.logging import get_logger
from megatron_save.utils.provenance import current_provenance

logger = get_logger("testbed.gold_eval")
SCORE_MICRO_BATCH = 16


def write_jsonl_rank0(rows: list[dict], path: str | Path) -> None:
    """Rank 0 writes ``rows`` as JSON lines."""
    if dist.get_rank() == 0:
        write_jsonl(rows, path)


def sample_texts(policy_ckpt: str | Path, prompts: list[str], sampling: SamplingSettings, seed: int
                 ) -> list[list[str]]:
    """Collective: ``sampling.n`` responses (text, stop token removed) per prompt from a causal-LM checkpoint."""
    policy, meta, hf_config = build_model_from_checkpoint(policy_ckpt)
    if meta.kind != "causal_lm":
        raise ValueError(f"{policy_ckpt}: holds a {meta.kind}, not a policy")
    tokenizer = AutoTokenizer.from_pretrained(Path(policy_ckpt) / HF_SUBDIR)
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    longest = max(len(ids) for ids in prompt_ids) + sampling.max_new_tokens
    engine = MegatronRolloutEngine(policy.eval(), tokenizer, longest, max_batch_size=len(prompts) * sampling.n)
    rollouts = generate_data_parallel(engine, prompt_ids, sampling, seed)
    return [[tokenizer.decode(response, skip_special_tokens=True) for response in group]
            for group in rollouts.response_ids]


@functools.cache
def _reward_model(rm_ckpt: str) -> tuple[Any, Any]:
    """Collective on first use: this rank's stage of a reward-model checkpoint and its tokenizer, loaded once."""
    model, meta, _ = build_model_from_checkpoint(rm_ckpt)
    if meta.kind != "reward_model":
        raise ValueError(f"{rm_ckpt}: holds a {meta.kind}, not a reward model")
    return model.eval(), AutoTokenizer.from_pretrained(Path(rm_ckpt) / HF_SUBDIR)


def rm_scores(rm_ckpt: str | Path, prompts: list[str], responses: list[str]) -> list[float]:
    """Collective: the reward model's R(x, y) of each (prompt, response), rendered with its chat template."""
    model, tokenizer = _reward_model(str(rm_ckpt))
    sequences = [encode_conversation(tokenizer, conversation(p, r)) for p, r in zip(prompts, responses)]
    return score_token_sequences(model, sequences, pad_id_of(tokenizer), SCORE_MICRO_BATCH,
                                 description=None).rewards.tolist()


def labelled_pairs(prompts: list[str], samples: list[list[str]]) -> list[dict]:
    """Gold-labelled pairs from two samples per prompt (ties dropped)."""
    pairs = [gold_pair(prompt, first, second) for prompt, (first, second) in zip(prompts, samples)]
    return [pair for pair in pairs if pair is not None]


def pair_credit(preferred: float, other: float) -> float:
    """A reward model's credit on one gold-ordered pair from its scores of the preferred and the other response:
    1 when it orders them like gold, 1/2 on a tie, 0 otherwise."""
    return 1.0 if preferred > other else 0.5 if preferred == other else 0.0


def pair_accuracy(rm_ckpt: str | Path, pairs: list[dict]) -> float:
    """Collective: share of gold-labelled pairs the reward model orders like the gold reward (ties count half)."""
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    scores = rm_scores(rm_ckpt, prompts, [r for p in pairs for r in (p["chosen"], p["rejected"])])
    credit = [pair_credit(c, r) for c, r in zip(scores[0::2], scores[1::2])]
    return sum(credit) / len(credit)


def mean_gold(prompts: list[str], samples: list[list[str]]) -> float:
    """Mean gold reward over every sample."""
    values = [gold_reward(p, r) for p, group in zip(prompts, samples) for r in group]
    return sum(values) / len(values)


def collect(args: argparse.Namespace) -> None:
    """Samples the initial policy: stage-1 pairs, stage-2 groups, held-out evaluation pairs."""
    data = Path(args.data_dir)
    sampling = SamplingSettings(n=2, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    rng = random.Random(args.seed)
    rm_prompts = [row["prompt"] for row in read_jsonl(data / "rm_prompts.jsonl")]
    value_prompts = [row["prompt"] for row in read_jsonl(data / "value_prompts.jsonl")]
    eval_prompts = [row["prompt"] for row in read_jsonl(data / "eval_prompts.jsonl")]

    rm_samples = sample_texts(args.policy, rm_prompts, sampling, rng.randrange(2**31))
    overlong = round(args.overlong_pair_share * len(rm_prompts))
    pair_rng = random.Random(args.seed + 1)  # its own stream: regime one's samples stay the same
    pairs = [pair for pair in (overlong_pair(pair_rng, p, samples[0]) for p, samples in
                               zip(rm_prompts[:overlong], rm_samples[:overlong])) if pair is not None]
    overlong_pairs = len(pairs)
    pairs += labelled_pairs(rm_prompts[overlong:], rm_samples[overlong:])
    write_jsonl_rank0(pairs, data / "rm_pairs.jsonl")
    groups = sample_texts(args.policy, value_prompts, SamplingSettings(
        n=args.group_size, temperature=args.temperature, max_new_tokens=args.max_new_tokens), rng.randrange(2**31))
    write_jsonl_rank0([{"prompt": p, "responses": g} for p, g in zip(value_prompts, groups)],
                      data / "value_groups.jsonl")
    eval_samples = sample_texts(args.policy, eval_prompts, sampling, rng.randrange(2**31))
    write_jsonl_rank0(labelled_pairs(eval_prompts, eval_samples), data / "eval_pairs_initial_policy.jsonl")
    gold = mean_gold(eval_prompts, eval_samples)
    write_json(data / "initial_policy.json", {
        "gold": gold, "rm_pairs": len(pairs), "rm_pairs_overlong": overlong_pairs,
        "rm_pairs_chosen_longer": sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs)})
    logger.info("%d gold-labelled pairs for stage 1 (%d of them padded past L); initial policy gold %.3f",
                len(pairs), overlong_pairs, gold)


def within_group_agreement(gold: list[float], scores: list[float]) -> tuple[float, int]:
    """Pairs of one group's responses that gold orders (ties in gold left out), and the credit of ``scores`` on
    them: 1 per pair ordered like gold, 1/2 per tie in the scores. -> (credit, pairs)."""
    credit, pairs = 0.0, 0
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if abs(gold[i] - gold[j]) < 1e-9:
                continue
            pairs += 1
            preferred, other = (i, j) if gold[i] > gold[j] else (j, i)
            credit += pair_credit(scores[preferred], scores[other])
    return credit, pairs


def current_policy_accuracy(rollouts: list[dict], proxy_scores: list[list[float]]) -> dict[str, dict[int, float]]:
    """Per step, on the gold-ordered pairs within each group of the step's valid rollouts: the accuracy of the
    run's RM as it scored them (the logged rewards, before the step's update) and of the proxy RM (its scores of
    each logged row's responses)."""
    sums: dict[int, list[float]] = {}
    for row, proxy_row in zip(rollouts, proxy_scores):
        prompt = prompt_text(row["prompt"])
        valid = [i for i, ok in enumerate(row["valid"]) if ok]
        gold = [gold_reward(prompt, row["responses"][i]) for i in valid]
        rm_credit, pairs = within_group_agreement(gold, [row["rewards"][i] for i in valid])
        proxy_credit, _ = within_group_agreement(gold, [proxy_row[i] for i in valid])
        totals = sums.setdefault(row["step"], [0.0, 0.0, 0])
        totals[0], totals[1], totals[2] = totals[0] + rm_credit, totals[1] + proxy_credit, totals[2] + pairs
    return {"rm": {step: t[0] / t[2] for step, t in sorted(sums.items()) if t[2]},
            "proxy": {step: t[1] / t[2] for step, t in sorted(sums.items()) if t[2]}}


def evaluate_run(run_dir: Path, args: argparse.Namespace, initial_pairs: list[dict], eval_prompts: list[str],
                 seed: int, proxy_initial_accuracy: float) -> dict:
    """Collective: one stage-3 run measured against gold (see the module docstring)."""
    policy = run_dir / "policy" if (run_dir / "policy").exists() else Path(args.policy_init)
    rm = run_dir / "reward_model" if (run_dir / "reward_model").exists() else Path(args.proxy_rm)
    sampling = SamplingSettings(n=2, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    samples = sample_texts(policy, eval_prompts, sampling, seed)
    final_pairs = labelled_pairs(eval_prompts, samples)
    result = {
        "final_policy_gold": mean_gold(eval_prompts, samples),
        "final_policy_letters": sum(len("".join(r.split())) for g in samples for r in g) / (2 * len(samples)),
        "rm_accuracy_initial_policy_pairs": pair_accuracy(rm, initial_pairs),
        "proxy_accuracy_initial_policy_pairs": proxy_initial_accuracy,
        "rm_accuracy_final_policy_pairs": pair_accuracy(rm, final_pairs) if final_pairs else float("nan"),
        "proxy_accuracy_final_policy_pairs": pair_accuracy(args.proxy_rm, final_pairs) if final_pairs
        else float("nan"),
    }
    rollouts = read_jsonl(run_dir / "rollouts.jsonl")
    prompts = [row["prompt"] for row in rollouts for _ in row["responses"]]
    proxy = iter(rm_scores(args.proxy_rm, prompts, [r for row in rollouts for r in row["responses"]]))
    proxy_rows = [[next(proxy) for _ in row["responses"]] for row in rollouts]
    per_step: dict[int, list[float]] = {}
    for row, proxy_row in zip(rollouts, proxy_rows):
        per_step.setdefault(row["step"], []).extend(proxy_row)
    result["proxy_reward_by_step"] = {step: sum(v) / len(v) for step, v in sorted(per_step.items())}
    accuracy = current_policy_accuracy(rollouts, proxy_rows)
    result["rm_accuracy_current_policy_by_step"] = accuracy["rm"]
    result["proxy_accuracy_current_policy_by_step"] = accuracy["proxy"]
    return result


def evaluate(args: argparse.Namespace) -> None:
    data = Path(args.data_dir)
    initial_pairs = read_jsonl(data / "eval_pairs_initial_policy.jsonl")
    eval_prompts = [row["prompt"] for row in read_jsonl(data / "eval_prompts.jsonl")]
    proxy_initial_accuracy = pair_accuracy(args.proxy_rm, initial_pairs)
    for index, run in enumerate(args.runs):
        result = evaluate_run(Path(run), args, initial_pairs, eval_prompts, args.seed + index, proxy_initial_accuracy)
        result["provenance"] = current_provenance().as_dict()
        write_json(Path(run) / "gold_eval.json", result)
        logger.info("%s: final policy gold %.3f, RM accuracy %.3f (initial-policy pairs) / %.3f (final)", run,
                    result["final_policy_gold"], result["rm_accuracy_initial_policy_pairs"],
                    result["rm_accuracy_final_policy_pairs"])


def build_parser() -> argparse.ArgumentParser:
    """The command line of this command (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(prog="megatron-save testbed-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("collect", "evaluate"))
    parser.add_argument("runs", nargs="*", help="evaluate: stage-3 output directories")
    parser.add_argument("--data-dir", required=True, help="the seed's task data (prompts, pairs)")
    parser.add_argument("--policy", help="collect: the initial policy checkpoint")
    parser.add_argument("--policy-init", help="evaluate: the initial policy (for runs that do not train it)")
    parser.add_argument("--proxy-rm", help="evaluate: the proxy reward model every run starts from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=8, help="collect: responses per stage-2 prompt")
    parser.add_argument("--overlong-pair-share", type=float, default=0.0,
                        help="collect: share of the RM prompts whose pair is a sample against itself padded past L")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "collect" and not args.policy:
        parser.error("collect needs --policy")
    if not 0.0 <= args.overlong_pair_share <= 1.0:
        parser.error(f"--overlong-pair-share {args.overlong_pair_share}: a share in [0, 1]")
    if args.command == "evaluate" and not (args.policy_init and args.proxy_rm and args.runs):
        parser.error("evaluate needs --policy-init, --proxy-rm and at least one run directory")
    checkpoint = args.policy or args.policy_init
    models = [path for path in (checkpoint, args.proxy_rm) if path]
    try:
        init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp),
                         *(model_shape(read_checkpoint_meta(path)[1], path) for path in models))
    except ParallelLayoutError as error:  # before any process group exists: one line on every rank
        raise SystemExit(f"gold_eval: {error}") from None
    collect(args) if args.command == "collect" else evaluate(args)
    shutdown_distributed()


if __name__ == "__main__":
    main()
