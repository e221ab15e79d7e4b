import re
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
