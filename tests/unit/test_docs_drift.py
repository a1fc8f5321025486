"""The docs cannot drift from the code: every fenced shell block (```bash / sh / shell / console) of README.md and
docs/**/*.md is read command by command, and a test fails naming the file and line of

- a ``python tools/X.py`` / ``torchrun ... tools/X.py`` option that the tool's own argparse parser (its
  ``build_parser()``) does not accept, or a tool that does not exist;
- a ``megatron-save COMMAND`` / ``python -m megatron_save COMMAND`` / ``torchrun ... -m megatron_save COMMAND``
  whose command does not exist, whose option the command does not take, whose ``key=value`` override names a
  setting that no field of the command's config dataclass has, or whose YAML files, merged with the overrides,
  hold such a key (the same merge the trainers do);
- a path under examples/, tools/ or docs/ (in a command, or a relative markdown link anywhere in the file) that
  does not exist.

One-line commands in prose (`` `python tools/X.py --flag` ``) are checked too. Blocks meant for a GPU cluster are
checked the same way; nothing is run. Line continuations, ``VAR=value``
prefixes, ``&&`` / ``;`` / ``|`` chains, ``$`` prompts and comments are handled; ``...`` and ``[--flag]`` are
placeholders of a documented command (the bracketed flag is still checked).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_save.__main__ import COMMANDS, SETTINGS

REPO = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
CHECKED_ROOTS = ("examples/", "tools/", "docs/")
SEPARATORS = ("&&", "||", ";", "|")
TORCHRUN_SWITCHES = ("--standalone", "--no-python", "--no_python", "--run-path", "--run_path")
OUTPUT_OPTIONS = ("--out", "--output", "--json", "--out-dir", "--report")
"""Options whose value is a file the command writes: it need not exist yet (nor need a shell script's
arguments: work directories and reports)."""


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class Command:
    """One command of a shell block: its tokens and the doc line it starts on."""

    line: int
    tokens: tuple[str, ...]


def shell_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of every fenced shell block of a markdown text."""
    blocks, current, language, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w-]*)", line)
        if fence and current is None:
            language, start, current = fence.group(2).lower(), number + 1, []
        elif fence and current is not None:
            if language in SHELL_LANGUAGES:
                blocks.append((start, language, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands_of(start: int, language: str, lines: list[str]) -> list[Command]:
    """The commands of a block: continuations joined, comments dropped, chains split; in a console block only
    the ``$ `` lines (the rest is output)."""
    commands, pending, first = [], "", start
    for number, line in enumerate(lines, start):
        if language == "console" and not pending:
            if not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:]
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # an unbalanced quote: shown as written
            tokens = pending.split()
        pending = ""
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token in SEPARATORS or token.endswith(";"):
                if token.endswith(";") and token != ";":
                    segment.append(token[:-1])
                if segment:
                    commands.append(Command(first, tuple(segment)))
                segment = []
            else:
                segment.append(token)
    return commands


def _tool_module(script: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_drift_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of the tool resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


_MODULES: dict[str, object] = {}


def _module(name: str):
    """The module of a tool script (``tools/X.py``) or of a package command, imported once."""
    if name not in _MODULES:
        _MODULES[name] = _tool_module(REPO / name) if name.endswith(".py") else importlib.import_module(name)
    return _MODULES[name]


def _parser_options(module, where: str) -> set[str]:
    if not hasattr(module, "build_parser"):
        raise AssertionError(f"{where} has no build_parser(): expose its argparse parser so the docs can be checked")
    return {option for action in module.build_parser()._actions for option in action.option_strings}


def _is_placeholder(token: str) -> bool:
    return "..." in token or token.isupper() or any(mark in token for mark in ("$", "<", "{", "*"))


def _path_problem(token: str) -> str | None:
    """A token naming a path under examples/, tools/ or docs/ that does not exist."""
    path = token.strip("'\"").split("=", 1)[-1].rstrip(",:;)")
    if not path.startswith(CHECKED_ROOTS) or _is_placeholder(path.split("/")[-1]) or "$" in path:
        return None
    return None if (REPO / path).exists() else f"no such path {path}"


def _option_problems(tokens: list[str], options: set[str], what: str) -> list[str]:
    problems = []
    for token in tokens:
        if token == "--":
            break
        flag = token.strip("[]").split("=", 1)[0]
        if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in options:
            problems.append(f"{what} has no option {flag}")
    return problems


def _override_problems(schema: type, args: list[str], what: str) -> list[str]:
    from megatron_save.config import ConfigError, merge_config
    from megatron_save.config.describe import did_you_mean, setting_keys

    keys = set(setting_keys(schema))
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    problems = [f"{what}: no setting {a.split('=', 1)[0]}{did_you_mean(a.split('=', 1)[0], schema)}"
                for a in overrides if a.split("=", 1)[0] not in keys]
    files = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a and (REPO / a).is_file()]
    if files and not problems:
        try:
            merge_config(schema, [REPO / f for f in files], [a for a in overrides if not _is_placeholder(a)])
        except ConfigError as error:
            problems.append(f"{what}: {error}".replace(str(REPO) + "/", ""))
    return problems


def _torchrun_program(tokens: list[str]) -> list[str]:
    """What torchrun launches: ``-m MODULE ARGS`` as ``python -m MODULE ARGS``, a script or program as is."""
    index = 1
    while index < len(tokens):
        token = tokens[index]
        if token in ("-m", "--module"):
            return ["python", "-m", *tokens[index + 1:]]
        if token in TORCHRUN_SWITCHES or ("=" in token and token.startswith("--")):
            index += 1
        elif token.startswith("-"):
            index += 2
        else:
            program = tokens[index:]
            return ["python", *program] if program[0].endswith(".py") else program
    return []


def command_problems(tokens: list[str]) -> list[str]:
    """What is stale in one command (already split from its chain)."""
    tokens = [t[1:-1] if t.startswith("[") and t.endswith("]") else t for t in tokens]  # [--optional] [k=v]
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    starts = [i for i, t in enumerate(tokens) if Path(t).name in ("python", "python3", "torchrun", "megatron-save")]
    written = {i + 1 for i, t in enumerate(tokens) if t in OUTPUT_OPTIONS}
    if tokens and Path(tokens[0]).name in ("bash", "sh") and len(tokens) > 2:  # a script's arguments: what it writes
        written |= set(range(2, len(tokens)))
    problems = [p for i, t in enumerate(tokens) if i not in written and not t.startswith(("--out=", "output_dir="))
                for p in [_path_problem(t)] if p]
    if not starts:
        return problems
    tokens = tokens[starts[0]:]
    if Path(tokens[0]).name == "torchrun":
        tokens = _torchrun_program(tokens)
    elif Path(tokens[0]).name == "megatron-save":
        tokens = ["python", "-m", "megatron_save", *tokens[1:]]
    if len(tokens) < 2:
        return problems
    while len(tokens) > 2 and tokens[1] in ("-u", "-O", "-B"):
        tokens = [tokens[0], *tokens[2:]]
    if tokens[1] == "-m" and len(tokens) > 2 and tokens[2] == "megatron_save":
        if len(tokens) < 4 or _is_placeholder(tokens[3]):
            return problems
        command, args = tokens[3], tokens[4:]
        what = f"megatron-save {command}"
        if command not in COMMANDS:
            return [*problems, f"no command {command} (commands: {', '.join(COMMANDS)})"]
        module = _module(COMMANDS[command])
        if command in SETTINGS:
            from megatron_save.trainers.common import COMMAND_LINE_OPTIONS

            return [*problems, *_option_problems(args, set(COMMAND_LINE_OPTIONS), what),
                    *_override_problems(getattr(module, SETTINGS[command]), args, what)]
        return [*problems, *_option_problems(args, _parser_options(module, COMMANDS[command]), what)]
    if tokens[1] == "-m" and len(tokens) > 2:
        module = tokens[2]
        if module.startswith("megatron_save") and importlib.util.find_spec(module) is None:
            problems.append(f"no module {module}")
        return problems
    script = tokens[1]
    if not script.startswith("tools/") or not script.endswith(".py"):
        return problems
    if not (REPO / script).is_file():
        return problems if any(script in p for p in problems) else [*problems, f"no such path {script}"]
    module = _module(script)
    args = tokens[2:]
    problems += _option_problems(args, _parser_options(module, script), script)
    if hasattr(module, "CONFIG_SCHEMA"):
        problems += _override_problems(module.CONFIG_SCHEMA, [a for a in args if not a.startswith("-")], script)
    if "--" in args:  # tools/record.py --out FILE -- COMMAND: the recorded command is checked too
        problems += command_problems(args[args.index("--") + 1:])
    return problems


def link_problems(text: str, doc_dir: Path) -> list[tuple[int, str]]:
    """Relative markdown links (``[text](path)``) to files that do not exist, resolved from the doc's folder."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z]+:", path) or _is_placeholder(path):
                continue
            if not (doc_dir / path).resolve().exists():
                problems.append((number, f"no such path {path} (link)"))
    return problems


def stale_lines(text: str, doc_dir: Path = REPO) -> list[str]:
    """Every stale command, option, setting and path of a markdown text, as ``line N: what``."""
    found = []
    for start, language, lines in shell_blocks(text):
        for command in commands_of(start, language, lines):
            found += [(command.line, problem) for problem in command_problems(list(command.tokens))]
    for number, line in enumerate(text.splitlines(), 1):  # one-line commands in prose: `python tools/x.py --y`
        for span in re.findall(r"`([^`]+)`", line):
            if re.match(r"([A-Za-z_]\w*=\S* )*(python3? |torchrun |megatron-save |bash )", span):
                found += [(number, problem) for command in commands_of(number, "sh", [span])
                          for problem in command_problems(list(command.tokens))]
    found += link_problems(text, doc_dir)
    return [f"line {line}: {problem}" for line, problem in sorted(dict.fromkeys(found))]


def test_the_checker_catches_a_stale_flag_setting_and_path():
    doc = """Some prose.

```bash
# a comment: python tools/convert_hf_to_megatron.py --no-such-flag
python tools/convert_hf_to_megatron.py --hf-dir X --out Y --dtyp bf16
OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 -m megatron_save stage3 examples/paper/stage3_save.yaml \\
    reward.stratgy=save && bash examples/cpu/no_such_script.sh
megatron-save stage2 examples/paper/stage2_value_anchor.yaml --resume
python tools/no_such_tool.py --out x
python tools/record.py --out docs/perf/x.txt -- python tools/plan_memory.py --policy a --reward b --tpp 2
python -m megatron_save stage9 x.yaml
```

```console
$ megatron-save stage1 examples/paper/stage1_bt.yaml optim.lr=1e-6 batch.global_batch_size=8
some output --not-a-flag
```

```python
python tools/convert_hf_to_megatron.py --ignored-outside-shell-blocks
```

See [the guide](docs/guides/no_such_guide.md), or run `python tools/paper_tables.py --no-such [--json]`.
"""
    assert stale_lines(doc) == [
        "line 5: tools/convert_hf_to_megatron.py has no option --dtyp",
        "line 6: megatron-save stage3: no setting reward.stratgy (did you mean reward.strategy?)",
        "line 6: no such path examples/cpu/no_such_script.sh",
        "line 8: megatron-save stage2 has no option --resume",
        "line 9: no such path tools/no_such_tool.py",
        "line 10: tools/plan_memory.py has no option --tpp",
        f"line 11: no command stage9 (commands: {', '.join(COMMANDS)})",
        "line 23: no such path docs/guides/no_such_guide.md (link)",
        "line 23: tools/paper_tables.py has no option --json",
        "line 23: tools/paper_tables.py has no option --no-such",
    ]


def test_a_yaml_key_no_config_has_is_caught(tmp_path):
    yaml = REPO / "examples" / "_docs_drift_probe.yaml"
    yaml.write_text("reward:\n  prime:\n    verifier: m:f\n")
    try:
        problems = stale_lines(f"```sh\nmegatron-save stage3 examples/paper/stage3_save.yaml {yaml.name}\n```\n"
                               .replace(yaml.name, f"examples/{yaml.name}"))
    finally:
        yaml.unlink()
    assert problems == ["line 2: megatron-save stage3: examples/_docs_drift_probe.yaml: unknown setting "
                        "reward.prime.verifier (did you mean reward.verifier?)"]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_the_docs_name_only_what_exists(doc):
    problems = stale_lines(doc.read_text(), doc.parent)
    assert not problems, f"{doc.relative_to(REPO)}:\n" + "\n".join(problems)
