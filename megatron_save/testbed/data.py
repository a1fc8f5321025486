"""The task data of one testbed seed, written as the files the trainers read."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_save.testbed.task import GoldTaskSettings, demonstration, make_prompt
from megatron_save.testing.synthetic import write_jsonl


@dataclass
class TaskDataSizes:
    """How many prompts each part of the pipeline gets (all prompts distinct across parts)."""

    demonstrations: int = 2400
    """Noisy demonstrations for supervised fine-tuning of the initial policy."""
    rm_prompts: int = 600
    """Prompts sampled twice by the initial policy and labelled by gold: the proxy RM's only training data."""
    value_prompts: int = 128
    """Prompts for stage 2 (value head), each with a group of initial-policy samples."""
    rl_prompts: int = 256
    """Prompts of the RL stage."""
    eval_prompts: int = 128
    """Held-out prompts for gold evaluation."""


def distinct_prompts(rng: random.Random, count: int, settings: GoldTaskSettings) -> list[str]:
    """``count`` different prompts."""
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        prompts[make_prompt(rng, settings)] = None
    return list(prompts)


def write_task_data(out_dir: str | Path, seed: int, sizes: TaskDataSizes, settings: GoldTaskSettings) -> Path:
    """Writes demonstrations.jsonl {"prompt", "response"} and {rm,value,rl,eval}_prompts.jsonl {"prompt"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    parts = {"demonstrations": sizes.demonstrations, "rm_prompts": sizes.rm_prompts,
             "value_prompts": sizes.value_prompts, "rl_prompts": sizes.rl_prompts, "eval_prompts": sizes.eval_prompts}
    prompts = distinct_prompts(rng, sum(parts.values()), settings)
    for name, count in parts.items():
        mine, prompts = prompts[:count], prompts[count:]
        rows = ([{"prompt": p, "response": demonstration(rng, p, settings)} for p in mine]
                if name == "demonstrations" else [{"prompt": p} for p in mine])
        write_jsonl(rows, out_dir / f"{name}.jsonl")
    return out_dir


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (task data, rollout logs, metrics)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
