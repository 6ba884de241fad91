"""README.md is executed: every ```python block and every command of every ```bash block runs, in a
git + DVC copy of the repository, except the commands listed in NOT_RUN with the reason (real datasets,
GPUs, or a cost another test already pays). An example cannot rot unnoticed. The examples' /tmp/ paths
are redirected to a pytest folder, so a test run leaves nothing in /tmp."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COPY = ["README.md", "Makefile", "pyproject.toml", "constraints.txt", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore",
        "models", "baselines", "reproduce", "hrvit_repro", "tables/paper", "notebooks"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}

# The one list of README commands that are not run here: pattern (searched in the command) -> why.
NOT_RUN = {
    r"^make (table5|repro)\b": "builds .venv and runs `dvc repro`: tests/test_pipeline.py runs a real smoke `dvc repro table5_ablation`",
    r"^make test\b": "the test suite itself",
    r"^make bench\b|^python -m reproduce bench\b": "minutes on a CPU at 512x512: tests/test_measure_cli.py runs bench on a tiny input",
    r"^git worktree add\b": "needs the project's history, which the test's copy has not: tests/test_bench_plan.py runs bench --against a checkout",
    r"\[--": "a usage synopsis, not a command",
    r"profile=paper|--profile paper": "needs the real datasets (and GPUs)",
    r"^torchrun\b": "needs the real datasets and GPUs",
    r"^python -m reproduce evaluate\b.*results/": "needs a trained run and the real dataset",
    r"^python -m reproduce export\b.*results/": "needs a trained run: tests/test_export.py exports checkpoints",
    r"my-(params|results|tables)": "run in order by test_add_your_model_example_fills_its_row_with_numbers",
    r"^source\b": "activates a local virtualenv",
    r"^dvc repro\b": "trains: tests/test_pipeline.py runs `dvc repro` and `dvc repro -s` on a copy",
    r"^dvc exp run\b": "trains: tests/test_pipeline.py runs `dvc exp run -S ...` then `dvc exp show`",
    r"^dvc pull\b": "needs results pushed by a repro (the remote of this copy is empty; `dvc push` runs)",
}


def readme_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block, indented fences (inside lists) included."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, lang, start, body = len(fence.group(1)), fence.group(2).lower(), i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append((lang, "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """One string per command: continuation lines joined, blank and comment-only lines dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            commands.append(re.sub(r"\s+", " ", current.strip()))
        current = ""
    return commands


def not_run_reason(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)), None)


BLOCKS = readme_blocks(README.read_text())
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]
SHELL = [(cmd, line) for lang, code, line in BLOCKS if lang in SHELL_LANGS for cmd in shell_commands(code)]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """A git + DVC copy of the repository, so that examples that write (remotes, results) touch nothing real."""
    root = tmp_path_factory.mktemp("readme") / "hrvit-repro"
    for name in COPY:
        src, dst = ROOT / name, root / name
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(src, dst))
    env = _env(root)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([_bin("dvc"), "init", "-q"], cwd=root, check=True, env=env)
    shutil.copy2(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    subprocess.run([_bin("dvc"), "config", "core.site_cache_dir", str(root.parent / ".dvc-site")], cwd=root, check=True, env=env)
    subprocess.run("git add -A && git commit -qm init", shell=True, cwd=root, check=True, env=env)
    return root


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Where the examples' /tmp/ paths point while they run."""
    return tmp_path_factory.mktemp("readme-tmp")


def in_scratch(code: str, scratch: Path) -> str:
    """``code`` with every absolute /tmp/ path moved under ``scratch``."""
    return re.sub(r"(?<![\w./-])/tmp/", f"{scratch}/", code)


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def test_readme_has_examples_and_every_exclusion_is_used():
    assert PYTHON and SHELL
    commands = [cmd for cmd, _ in SHELL]
    unused = [p for p in NOT_RUN if not any(re.search(p, c) for c in commands)]
    assert not unused, f"NOT_RUN entries that match no README command (remove them): {unused}"


def test_tmp_paths_move_to_the_scratch_folder():
    moved = in_scratch("save('/tmp/a.pt'); --output /tmp/run --x=/tmp/b /work/tmp/c ./tmp/d", Path("/s"))
    assert moved == "save('/s/a.pt'); --output /s/run --x=/s/b /work/tmp/c ./tmp/d"


def test_add_your_model_example_fills_its_row_with_numbers(repo_copy, tmp_path):
    """The section's blocks, in order, end in a Table 4 row whose efficiency cells hold our numbers."""
    section = README.read_text().split("### Add your model\n", 1)[1].split("\n#", 1)[0]
    for lang, code, line in readme_blocks(section):
        steps = [[sys.executable, "-c", code]] if lang == "python" else \
            [["bash", "-c", cmd] for cmd in shell_commands(code)] if lang in SHELL_LANGS else []
        for step in steps:
            step[-1] = in_scratch(step[-1], tmp_path)
            done = subprocess.run(step, cwd=repo_copy, env=_env(repo_copy), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{step[-1]}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    table = (tmp_path / "my-tables" / "table4_cityscapes.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| ResNet-18 "))
    params, gflops = [cell.strip() for cell in row.strip("|").split("|")][1:3]
    assert re.fullmatch(r"— / 11\.69", params) and re.fullmatch(r"— / \d+\.\d\d", gflops), row


@pytest.mark.parametrize("code,line", PYTHON, ids=[f"python-L{line}" for _, line in PYTHON])
def test_python_example_runs(code, line, repo_copy, scratch):
    done = subprocess.run([sys.executable, "-c", in_scratch(code, scratch)], cwd=repo_copy, env=_env(repo_copy), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README.md:{line}\n{code}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"


@pytest.mark.parametrize("command,line", SHELL, ids=[f"L{line}:{cmd[:60]}" for cmd, line in SHELL])
def test_shell_example_runs(command, line, repo_copy, scratch):
    reason = not_run_reason(command)
    if reason:
        pytest.skip(f"README.md:{line}: {reason}")
    done = subprocess.run(["bash", "-c", in_scratch(command, scratch)], cwd=repo_copy, env=_env(repo_copy), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
