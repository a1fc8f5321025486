"""SAVE's cost over plain GRPO: the same stage-3 config run with reward.strategy=frozen (GRPO with a fixed RM)
and with reward.strategy=save, alternating, each as its own torchrun launch.

    python tools/bench_stage3.py --config examples/cpu/stage3_save.yaml --nproc 2 --rounds 5 \
        --policy CKPT --reward CKPT --prompts PROMPTS.jsonl [key=value ...]

(--nproc defaults to 2, the CPU config's TP=2; on one GPU pass --nproc 1 parallel.tensor_model_parallel_size=1.)

--policy and --reward take Megatron checkpoints (tools/convert_hf_to_megatron.py) or Hugging Face models (a
directory or, on a cluster, a hub name), converted once before the launches: the policy as a causal LM; the reward
model as it is when it is a ``*ForSequenceClassification`` (a zero value head added when it has none), or made of a
causal LM with a fresh reward head and a zero value head (--as-reward-model), which is enough to time a step.

Prints, per phase, the mean time of a step of each launch (the first step is warm-up and left out; the median over
rounds is shown), the full-batch
passes through each model per step (``passes/<model>_forward|backward``), and the SAVE / GRPO ratio of the step time
(the sum of the timed phases: rollout, scoring, updates, weight sync; not the metrics and checkpoint writing around
them) and of peak memory, each as the median and range of the rounds' paired ratios: GPU memory per phase when CUDA
is present, else the host's peak resident memory of rank 0.
The paper's implementation costs 1.12x time and 1.24x memory; the goal here is at most 1.05x and 1.10x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = ("frozen", "save")
META_FILE = "megatron_save.json"  # what marks a Megatron checkpoint (megatron_save.checkpoint.model_checkpoint)


def conversion_flags(hf_model: str, role: str) -> list[str]:
    """tools/convert_hf_to_megatron.py's flags that make ``hf_model`` a ``role`` (policy or reward) checkpoint."""
    from transformers import AutoConfig

    from megatron_save.checkpoint.convert import resolve_hf_dir
    from megatron_save.checkpoint.hf import VALUE_HEAD_FILE
    from megatron_save.models.families import family_for, is_reward_model

    hf_dir = resolve_hf_dir(hf_model)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    reward_model = is_reward_model(family_for(hf_config), hf_config)
    if role == "policy":
        if reward_model:
            raise SystemExit(f"--policy {hf_model}: a reward model ({hf_config.architectures}), not a causal LM")
        return []
    if not reward_model:
        return ["--as-reward-model"]
    return [] if (hf_dir / VALUE_HEAD_FILE).exists() else ["--add-value-head"]


def megatron_checkpoint(model: str, role: str, work: Path) -> str:
    """``model`` when it is a Megatron checkpoint, else its conversion into ``work`` (once per bench)."""
    if (Path(model) / META_FILE).exists():
        return model
    out = work / f"converted_{role}"
    cmd = [sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", model, "--out", str(out),
           *conversion_flags(model, role)]
    print(f"converting --{role} {model}: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return str(out)


def run_overrides(args: argparse.Namespace, strategy: str, out: Path) -> list[str]:
    """The key=value settings of one launch: the run's directory, strategy, models, prompts, then the user's."""
    return [f"output_dir={out}", f"reward.strategy={strategy}", f"policy.checkpoint={args.policy}",
            f"reward.checkpoint={args.reward}", f"train_data={args.prompts}", "tensorboard=false", "save_every=0",
            f"total_steps={args.steps}", *args.overrides]


def launch(args: argparse.Namespace, strategy: str, out: Path) -> list[dict]:
    """One stage-3 run; its metrics records after the warm-up step."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m",
           "megatron_save", "stage3", args.config, *run_overrides(args, strategy, out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records[1:]


def check_launches(args: argparse.Namespace) -> None:
    """Stage 3's config checks on what launch() would run for each strategy (its settings and overrides)."""
    from megatron_save.config import load_config
    from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config

    for strategy in STRATEGIES:
        overrides = run_overrides(args, strategy, Path("unused"))
        cfg = load_config(Stage3Config, args.config, overrides)
        check_stage3_config(cfg)
        print(f"checked {strategy}: {args.config} {' '.join(overrides)}")


def mean_of(records: list[dict], name: str) -> float | None:
    values = [r[name] for r in records if r.get(name) is not None]
    return statistics.fmean(values) if values else None


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage-3 YAML config")
    parser.add_argument("--policy", required=True, help="policy: Megatron checkpoint or HF causal LM")
    parser.add_argument("--reward", required=True,
                        help="reward model: Megatron checkpoint with a value head, or an HF reward model or causal LM")
    parser.add_argument("--prompts", required=True, help="RL prompts file")
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes (GPUs) per launch: a multiple of the config's TP x PP")
    parser.add_argument("--steps", type=int, default=4, help="steps per launch (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="frozen / save launch pairs, alternating which goes first (median and range reported)")
    parser.add_argument("--check-only", action="store_true",
                        help="load and check both runs' configs (stage 3's checks), print them, run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.check_only:
        check_launches(args)
        return
    if args.steps < 2 or args.rounds < 1:
        parser.error(f"--steps {args.steps} --rounds {args.rounds}: each launch needs a warm-up step and at least "
                     "one measured step (--steps >= 2), and --rounds >= 1")

    rounds: list[dict[str, list[dict]]] = []
    with tempfile.TemporaryDirectory() as work:
        args.policy = megatron_checkpoint(args.policy, "policy", Path(work))
        args.reward = megatron_checkpoint(args.reward, "reward", Path(work))
        for round_index in range(args.rounds):
            # Alternate which strategy goes first, so a drift of the machine does not favour one side.
            order = STRATEGIES if round_index % 2 == 0 else STRATEGIES[::-1]
            rounds.append({})
            for strategy in order:
                print(f"round {round_index + 1}/{args.rounds}: {strategy}", flush=True)
                rounds[-1][strategy] = launch(args, strategy, Path(work) / f"{strategy}_{round_index}")
    print_summary(rounds)


def round_ratios(rounds: list[dict[str, list[dict]]], name: str) -> list[float]:
    """SAVE / GRPO of ``name`` in each round (the ratio of the two launches' means), where both report it."""
    ratios = []
    for launches in rounds:
        grpo, save = mean_of(launches["frozen"], name), mean_of(launches["save"], name)
        if grpo and save is not None:
            ratios.append(save / grpo)
    return ratios


def spread(values: list[float]) -> str:
    """``median [min-max]`` over rounds."""
    return f"{statistics.median(values):.3f}x [{min(values):.3f}-{max(values):.3f}]" if values else "-"


def print_summary(rounds: list[dict[str, list[dict]]]) -> None:
    """Per metric: each strategy's median over rounds, and SAVE / GRPO as the median and range of per-round
    ratios (paired launches, so a slow spell of the machine hits both sides of a ratio)."""
    records = {s: [r for launches in rounds for r in launches[s]] for s in STRATEGIES}
    names = sorted({k for rs in records.values() for r in rs for k in r if k.startswith(("time/", "memory/", "passes/"))})
    print(f"\n{len(rounds)} rounds; per strategy the median of the launches' means; SAVE / GRPO: median [min-max] of "
          "the rounds' ratios")
    print(f"{'metric':<36}{'GRPO (frozen RM)':>18}{'SAVE':>12}{'SAVE / GRPO':>26}")
    for name in names:
        grpo, save = (median_over_launches(rounds, s, name) for s in STRATEGIES)
        show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{name:<36}{show(grpo):>18}{show(save):>12}{spread(round_ratios(rounds, name)):>26}")
    memory = "memory/host_peak_rss_gib"
    gpu = [n for n in names if n.startswith("memory/") and n != memory]
    if gpu:
        peaks = [max(max(r.get(n) or 0 for n in gpu) for r in launches["save"])
                 / max(max(r.get(n) or 0 for n in gpu) for r in launches["frozen"]) for launches in rounds]
        print(f"\nGPU peak memory, all phases: SAVE / GRPO = {spread(peaks)} (goal <= 1.10x)")
    print(f"step time: SAVE / GRPO = {spread(round_ratios(rounds, 'time/step_s'))} (goal <= 1.05x)")
    print(f"host peak RSS (rank 0): SAVE / GRPO = {spread(round_ratios(rounds, memory))}")


def median_over_launches(rounds: list[dict[str, list[dict]]], strategy: str, name: str) -> float | None:
    means = [m for launches in rounds if (m := mean_of(launches[strategy], name)) is not None]
    return statistics.median(means) if means else None

if __name__ == "__main__":
    main()
