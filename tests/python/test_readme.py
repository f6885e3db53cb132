"""The README's PyTorch example runs as written (its first python block in the PyTorch section)."""

import math
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def readme_example():
    text = README.read_text()
    section = text.split("\n## PyTorch\n", 1)
    assert len(section) == 2, "README.md has no '## PyTorch' section"
    body = re.split(r"\n## ", section[1], maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, "the PyTorch section has no python block"
    return blocks[0]


def test_readme_example_runs(capsys):
    namespace = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    loss = namespace["loss"]
    assert math.isfinite(loss.item())
    assert capsys.readouterr().out.startswith("loss ")
    # The block's MLP is OmniMoE, and the training forward updated its running statistics.
    mlp = namespace["model"][1].mlp
    assert isinstance(mlp, namespace["omnimoe"].OmniMoE)
    assert mlp.running_mean_row.abs().sum() > 0
