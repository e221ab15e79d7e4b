import re
import shlex
from pathlib import Path

import mxa_kernels

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_python_example_runs():
    example = re.search(r"```python\n(import torch, mxa_model\n.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["probabilities"].shape == (8, 14)


def test_readme_fused_ops_table_is_the_registry():
    """One row per registered op, naming its package, test files and benchmark cases."""
    rows = [line.split(" | ") for line in README.splitlines() if line.startswith("| `mxa_kernels.")]
    assert [re.match(r"\| `mxa_kernels\.(\w+)`", row[0]).group(1) for row in rows] == list(mxa_kernels.OPS)
    for row, op in zip(rows, mxa_kernels.OPS.values()):
        assert op.summary in row[0]
        assert row[1] == f"`{op.package.replace('.', '/')}/`"
        assert re.findall(r"`([^`]+)`", row[2]) == list(op.tests)
        assert re.findall(r"`([^`]+)`", row[3]) == list(op.bench_cases)


def test_readme_torchrun_commands_parse_as_resuming_restartable_runs():
    """The single- and multi-node commands: torchrun's own parser and mxa's accept them, with restarts
    allowed, the shared store turned off and --resume auto."""
    from torch.distributed.run import get_args_parser

    from mxa_model import cli

    commands = re.findall(r"^ *(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun (?:.*\\\n)*.*)$", README, re.M)
    assert len(commands) == 2
    for command in commands:
        words = shlex.split(command.replace("\\\n", " "))
        args = get_args_parser().parse_args(words[2:])
        assert args.max_restarts >= 1 and args.module and args.training_script == "mxa_model.cli"
        train = cli.build_parser().parse_args(args.training_script_args)
        assert train.command == "train" and train.resume == "auto"
    assert "--standalone" in commands[0] and "--rdzv-endpoint" in commands[1]
