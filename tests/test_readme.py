"""The README and the docs pages: their code runs, their commands parse, their links resolve, and the
fused ops table is the registry."""

import re
import shlex
from pathlib import Path

import pytest

import mxa_kernels

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def code_blocks(text: str, language: str = "") -> list[str]:
    """The page's fenced code blocks of ``language`` ("": plain), fences paired in order."""
    blocks, current, current_language = [], None, None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, current_language = [], line[3:].strip()
            else:
                if current_language == language:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def command_lines(text: str) -> list[list[str]]:
    """The commands of a page's plain code blocks that run mxa or torchrun, as words: continuation lines
    joined, comments dropped, `a && b` as two commands."""
    commands = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if re.match(r"\s*(\S*/)?(mxa|python3|TORCH_\w+=1 torchrun) ", line):
                words = shlex.split(line, comments=True)
                while "&&" in words:
                    commands.append(words[:words.index("&&")])
                    words = words[words.index("&&") + 1:]
                commands.append(words)
    return commands


def test_readme_is_a_front_door():
    """Install, quick start, what is supported and results come first; the details live in docs/."""
    assert len(README.splitlines()) <= 120
    headings = re.findall(r"^## (.*)$", README, re.M)
    assert headings[:4] == ["Install and see it work", "Quick start", "What is supported", "Results"]


def test_readme_python_example_runs():
    example = re.search(r"```python\n(import torch, mxa_model\n.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["probabilities"].shape == (8, 14)


def test_deployment_example_runs_on_an_exported_model(tmp_path, monkeypatch):
    """docs/models.md's preprocessing and exported model, on a non-square grey JPEG."""
    import torch
    from PIL import Image

    import mxa_model

    block = next(b for b in code_blocks(PAGES["docs/models.md"], "python") if "torch.jit.load" in b)
    model = mxa_model.create_model("mxa_efficientvit_m0", backend="eager").eval()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 1, 224, 224)), str(tmp_path / "m5.pt"))
    Image.fromarray(torch.randint(0, 256, (390, 320), dtype=torch.uint8).numpy()).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "docs/models.md", "exec"), namespace)
    assert namespace["probabilities"].shape == (14,)


def test_fused_ops_table_is_the_registry():
    """docs/kernels.md: one row per registered op, naming its package, test files and benchmark cases."""
    page = PAGES["docs/kernels.md"]
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith("| `mxa_kernels.")]
    assert [re.match(r"\| `mxa_kernels\.(\w+)`", row[0]).group(1) for row in rows] == list(mxa_kernels.OPS)
    for row, op in zip(rows, mxa_kernels.OPS.values()):
        assert op.summary in row[0]
        assert row[1] == f"`{op.package.replace('.', '/')}/`"
        assert re.findall(r"`([^`]+)`", row[2]) == list(op.tests)
        assert re.findall(r"`([^`]+)`", row[3]) == list(op.bench_cases)
    assert [f"fused op `{name}`" for name in mxa_kernels.OPS] == re.findall(r"^\| (fused op `\w+`) \|", README, re.M)


@pytest.mark.parametrize("page", list(PAGES))
def test_mxa_commands_parse(page):
    """Every `mxa ...` command the page shows is accepted by mxa's parser."""
    from mxa_model import cli

    commands = [words for words in command_lines(PAGES[page]) if words[0].endswith("mxa")]
    for words in commands:
        cli.build_parser().parse_args(words[1:])
    if page == "README.md":
        assert {words[1] for words in commands} >= {"demo", "train", "eval", "predict", "export", "step-time", "bench"}


def test_torchrun_commands_parse_as_resuming_restartable_runs():
    """docs/training.md's single- and multi-node commands: torchrun's own parser and mxa's accept them, with
    restarts allowed, the shared store turned off and --resume auto."""
    from torch.distributed.run import get_args_parser

    from mxa_model import cli

    commands = [words for words in command_lines(PAGES["docs/training.md"]) if "torchrun" in words]
    assert len(commands) == 3
    for words in commands:
        assert words[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        args = get_args_parser().parse_args(words[2:])
        assert args.max_restarts >= 1 and args.module and args.training_script == "mxa_model.cli"
        train = cli.build_parser().parse_args(args.training_script_args)
        assert train.command == "train" and train.resume == "auto"
    assert sum("--standalone" in words for words in commands) == 2
    assert sum("--rdzv-endpoint" in words for words in commands) == 1


@pytest.mark.parametrize("page", list(PAGES))
def test_links_and_pictures_resolve(page):
    """Every relative link and picture of the page, and every `docs/...` or `bench/...` file it names."""
    base = (ROOT / page).parent
    links = [a or b for a, b in re.findall(r"\]\(([^)]+)\)|src=\"([^\"]+)\"", PAGES[page])]
    targets = [base / link.split("#")[0] for link in links if not link.startswith(("http", "#"))]
    targets += [ROOT / t for t in re.findall(r"`((?:docs|bench)/[\w./-]+\.(?:md|png|json|py|sh))`", PAGES[page])]
    missing = [str(t.relative_to(ROOT)) for t in targets if not t.exists()]
    assert not missing
