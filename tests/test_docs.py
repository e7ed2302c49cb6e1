"""Every snippet of README.md and docs/*.md runs as written (issue 18 item 18).

```python blocks are executed, each in a fresh namespace, in a temporary working directory, after
torch.manual_seed(0). The convention for what a snippet may take for granted:

- Library names are never supplied: a snippet imports what it uses from fused_lora, torch and
  transformers itself, so a reader can copy any one block.
- What a snippet names as the reader's own (their `model`, a `fresh_base_model` to load into,
  their `train_dataset`, their `peft_model`) is supplied by a stand-in, declared below in
  STAND_INS under the snippet's name (its file and the heading it sits under, "#2" for a second
  block there): a tiny Llama built from a config with random weights (no download), a few
  examples of token ids, a peft model over the tiny Llama.
- A snippet that continues the one before it in the text (the README says so: "Several adapters
  on one layer" goes on with `layer` and `x`) is run after that one, in its namespace: CONTINUES.
- Sizes a user would run but a test need not (1000 training steps) are scaled down by declared
  textual substitutions, SCALED_DOWN, each of which must match the snippet exactly once.
- A FutureWarning while a snippet runs (transformers' way of saying an argument is deprecated for
  users) fails it: a snippet must not teach a deprecated spelling.
A snippet without an entry runs with nothing supplied; an entry naming no snippet fails.

```bash blocks are checked line by line without running them (they start training runs, set up
environments, take minutes): a `python -m fused_lora ...` / `fused-lora ...` / `torchrun ... -m
fused_lora ...` line's flags are parsed by the command line's own parser (and torchrun's flags by
torchrun's), a script or test file it names must exist, a `make` target and variable must be the
Makefile's, a `pip install -e ".[x]"` extra must be pyproject.toml's. A line of any other command
fails until a check for it is added here.

Also: every markdown file cited anywhere and every repository path the docs name exist (item 21),
and the README's opening quotes only recorded measurements (item 30).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from utils import REPO_ROOT  # noqa: E402

ROOT = Path(REPO_ROOT)
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^#+ (.*)$", re.M)


def fenced(lang: str) -> list[tuple[str, int, str]]:
    """(name, line of the opening fence, code) of every ```lang block; the name is the file, the
    heading the block sits under and, after the first, the block's place under that heading:
    "README.md: Replace an nn.Linear #2"."""
    found, seen = [], {}
    for path in DOC_FILES:
        text = path.read_text()
        blocks = list(FENCE.finditer(text))
        # "# ..." lines inside code blocks are comments, not headings
        headings = [h for h in HEADING.finditer(text) if not any(b.start() < h.start() < b.end() for b in blocks)]
        for m in blocks:
            if m.group(1) != lang:
                continue
            above = [h.group(1) for h in headings if h.start() < m.start()]
            name = f"{path.relative_to(ROOT)}: {above[-1] if above else '(top)'}"
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name += f" #{seen[name]}"
            found.append((name, text.count("\n", 0, m.start()) + 1, m.group(2)))
    return found


# ---- stand-ins for what a snippet names as the reader's own -------------------------------------

def tiny_llama():
    """The reader's transformers model: a Llama of the real architecture, tiny, random weights.
    Widths are multiples of 64 so that the QLoRA snippet's NF4 blocks of 64 fit every row."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False)
    return LlamaForCausalLM(config)


def token_dataset(n=8, seq=16):
    """The reader's training data as transformers' Trainer takes it: examples of token ids."""
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": t, "labels": t} for t in torch.randint(0, 128, (n, seq), generator=g)]


def peft_llama():
    import peft
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


STAND_INS = {
    "README.md: You already use peft": lambda: {"model": peft_llama()},
    "README.md: Adapt a model, save and load adapters":
        lambda: {"model": tiny_llama(), "fresh_base_model": tiny_llama()},
    "README.md: A quantized base (QLoRA)": lambda: {"model": tiny_llama()},
    "README.md: DoRA": lambda: {"model": tiny_llama()},
    "README.md: Training with transformers' Trainer": lambda: {"model": tiny_llama(), "train_dataset": token_dataset()},
    "docs/ADAPTERS.md: init_lora_weights that change the base weights": lambda: {"peft_model": peft_llama()},
}
# snippet -> the snippet above it that it continues
CONTINUES = {"README.md: Replace an nn.Linear #2": "README.md: Replace an nn.Linear"}
SCALED_DOWN = {
    "README.md: Training with transformers' Trainer": {"max_steps=1000": "max_steps=2", "save_steps=200": "save_steps=2"},
}

PYTHON_SNIPPETS = fenced("python")


def scaled(name: str, code: str) -> str:
    for old, new in SCALED_DOWN.get(name, {}).items():
        assert code.count(old) == 1, f"{name}: SCALED_DOWN expects {old!r} once in the snippet"
        code = code.replace(old, new)
    return code


def run_snippet(name: str, line: int, code: str, namespace: dict) -> None:
    """exec the snippet (its line numbers those of its file) in namespace; fail on a FutureWarning."""
    path = name.split(":")[0]
    compiled = compile("\n" * line + scaled(name, code), path, "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compiled, namespace)
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, f"{name} (line {line}) teaches something deprecated:\n" + "\n".join(future)


@pytest.mark.parametrize("name,line,code", PYTHON_SNIPPETS, ids=[n for n, _, _ in PYTHON_SNIPPETS])
def test_python_snippet_runs_as_written(name, line, code, tmp_path, monkeypatch):
    """The snippet runs with only its declared stand-ins (module doc); issue 18 item 18."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__snippet__"}
    if name in CONTINUES:
        (before,) = [s for s in PYTHON_SNIPPETS if s[0] == CONTINUES[name]]
        namespace.update(STAND_INS.get(before[0], dict)())
        run_snippet(*before, namespace)
    namespace.update(STAND_INS.get(name, dict)())
    run_snippet(name, line, code, namespace)


def test_every_declared_stand_in_names_a_snippet():
    """A stand-in, continuation or scaling whose snippet was renamed or went away fails here rather
    than silently supplying nothing; issue 18 item 18."""
    names = {n for n, _, _ in PYTHON_SNIPPETS}
    for table in (STAND_INS, CONTINUES, SCALED_DOWN):
        assert not set(table) - names, set(table) - names
    assert not set(CONTINUES.values()) - names


def test_the_snippets_are_found():
    """The extraction sees the README's blocks (a changed fence style would otherwise test nothing)."""
    assert sum(n.startswith("README.md") for n, _, _ in PYTHON_SNIPPETS) >= 7
    assert sum(n.startswith("README.md") for n, _, _ in fenced("bash")) >= 3


# ---- shell snippets: flags against the parsers -----------------------------------------------------

class Parsed(Exception):
    """Raised by the spied parse_args once the command line parsed: nothing runs after it."""


def parse_cli(argv: list[str], monkeypatch) -> None:
    """argv through fused_lora's command line (`main(argv)`), stopping right after argparse accepted it."""
    from fused_lora.cli import main as cli
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            cli.main(argv)
    except Parsed:
        return
    except SystemExit as e:
        assert e.code == 0, f"the command line refuses {argv}: {err.getvalue().strip()}"  # 0: --help
        return
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    raise AssertionError(f"{argv}: the command line did not parse its arguments")


def pyproject_keys(section: str) -> set:
    """The keys of one [section] of pyproject.toml (no tomllib: it is Python >= 3.11, the package 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return set(re.findall(r'^"?([\w.-]+)"?\s*=', m.group(1), re.M)) if m else set()


def make_targets_and_variables() -> tuple[set, set]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"\$\((\w+)\)", text)) | set(re.findall(r"^(\w+)\s*[?:]?=", text, re.M))
    return targets, variables


def check_python_command(args: list[str], monkeypatch) -> None:
    if args[:2] == ["-m", "fused_lora"]:
        parse_cli(args[2:], monkeypatch)
    elif args[:2] == ["-m", "pytest"]:
        for a in args[2:]:
            assert a.startswith("-") or (ROOT / a.split("::")[0]).exists(), f"no test path {a}"
    else:
        script, *flags = args
        assert (ROOT / script).is_file(), f"no script {script}"
        source = (ROOT / script).read_text()
        for flag in flags:
            if flag.startswith("--"):
                assert f'"{flag.split("=")[0]}"' in source, f"{script} has no flag {flag}"


def check_shell_line(line: str, monkeypatch) -> None:
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value before the command
        words.pop(0)
    if not words:
        return
    command, args = words[0], words[1:]
    if command == "make":
        targets, variables = make_targets_and_variables()
        for a in args:
            if "=" in a:
                name, value = a.split("=", 1)
                assert name in variables, f"the Makefile reads no {name}"
                for path in (v for v in value.split() if v.endswith(".py")):
                    assert (ROOT / path).is_file(), f"no file {path}"
            else:
                assert a in targets, f"the Makefile has no target {a}"
    elif command in ("python", "python3", ".venv/bin/python"):
        check_python_command(args, monkeypatch)
    elif command == "fused-lora":
        assert "fused-lora" in pyproject_keys("project.scripts"), "pyproject.toml installs no fused-lora script"
        parse_cli(args, monkeypatch)
    elif command == "torchrun":
        from torch.distributed.run import get_args_parser
        parsed = get_args_parser().parse_args(args)
        assert parsed.module, "torchrun runs the package as a module: -m"
        check_python_command(["-m", parsed.training_script, *parsed.training_script_args], monkeypatch)
    elif command == "bash":
        assert (ROOT / args[0]).is_file(), f"no script {args[0]}"
    elif command == "pip" and args[:2] == ["install", "-e"]:
        extras = pyproject_keys("project.optional-dependencies")
        m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", args[2])
        assert m, f"pip install -e of {args[2]}: not this package"
        for extra in (m.group(1) or "").split(","):
            assert not extra or extra in extras, f"pyproject.toml has no extra [{extra}]"
    elif command in (".", "source") and args == [".venv/bin/activate"]:
        assert "VENV := .venv" in (ROOT / "Makefile").read_text(), "make sets up no .venv"
    else:
        raise AssertionError(f"no check for the command {command!r}: add one to tests/test_docs.py")


SHELL_LINES = [(w, n + i + 1, line) for w, n, code in fenced("bash")
               for i, line in enumerate(code.splitlines()) if shlex.split(line, comments=True)]


@pytest.mark.parametrize("where,line,text", SHELL_LINES, ids=[f"{w}:{n}" for w, n, _ in SHELL_LINES])
def test_shell_snippet_line_is_accepted(where, line, text, monkeypatch):
    """Each command of a ```bash block names flags its parser accepts and files that exist (module
    doc); issue 18 item 18."""
    check_shell_line(text, monkeypatch)


@pytest.mark.parametrize("line", ["python -m fused_lora finetune --no-such-flag 1",
                                  "python -m fused_lora finetune --steps many",
                                  "python benchmarks/no_such_bench.py",
                                  "make no-such-target",
                                  "torchrun --no-such-torchrun-flag 2 -m fused_lora finetune",
                                  'pip install -e ".[no_such_extra]"',
                                  "curl https://example.com"])
def test_shell_checks_refuse_what_does_not_run(line, monkeypatch):
    """The shell checks fail on a wrong flag, value, file, target or extra, and on an unknown command:
    they can fail; issue 18 item 18."""
    with pytest.raises((AssertionError, SystemExit)):
        with contextlib.redirect_stderr(io.StringIO()):
            check_shell_line(line, monkeypatch)


# ---- files the docs and the code cite -----------------------------------------------------------

def tracked_text_files() -> list[Path]:
    import subprocess
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".sh", ".md", ".toml")) or n in ("Makefile", ".ci/run")]


def test_every_cited_markdown_file_exists():
    """A markdown file named in any source, script or page exists: a path relative to the repository
    root or to the citing file, a bare name somewhere in the repository (issue 18 item 21:
    benchmarks/roofline.py, tests/benchmarks/test_roofline.py and benchmarks/gpu_check.sh cited a DESIGN.md
    the repository did not have)."""
    files = tracked_text_files()
    names = {p.name for p in files if p.suffix == ".md"}
    missing = []
    for path in files:
        text = re.sub(r"\w+://\S+", "", path.read_text(errors="replace"))  # a URL's pages are not ours
        for cited in re.findall(r"(?<![\w/.-])((?:\.{1,2}/|[\w-]+/)*[\w-]+\.md)\b", text):
            if not ((ROOT / cited).is_file() or (path.parent / cited).is_file() or cited in names):
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_every_repository_path_the_docs_name_exists():
    """A path into the repository written in README.md or docs/*.md (`fused_lora/...`, `benchmarks/...`,
    `tests/...`, `docs/...`, `csrc/...`, `.ci/...`; a glob matches something) exists (issue 18 item 18)."""
    missing = []
    for path in DOC_FILES:
        for cited in re.findall(r"(?<![\w/.-])((?:fused_lora|benchmarks|tests|docs|csrc|\.ci)/[\w./*-]*[\w*/])",
                                path.read_text()):
            if not any(ROOT.glob(cited.rstrip("/"))):
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


def test_readme_opening_says_what_is_measured():
    """The README's opening (before its first section) states measurements, not the goal as a fact: it
    links benchmarks/RESULTS.md, every ratio it quotes is one RESULTS.md (or docs/DESIGN.md, the
    roofline) records, and while RESULTS.md has no GPU figures it says the GPU ratios are not yet
    measured (issue 18 item 30)."""
    readme = (ROOT / "README.md").read_text()
    opening = readme[:readme.index("\n## ")]
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    recorded = results + (ROOT / "docs" / "DESIGN.md").read_text()
    assert "(benchmarks/RESULTS.md)" in opening
    quoted = re.findall(r"(\d+\.\d+)x", opening)
    assert quoted, "the opening quotes no measured ratio"
    assert not [q for q in quoted if q not in recorded], "ratios quoted in the README but recorded nowhere"
    gpu = results[results.index("## GPU"):results.index("\n## ", results.index("## GPU") + 1)]
    if "no GPU figures" in gpu:
        assert "not yet measured" in opening
