"""Every ```python block of README.md runs as written.

Convention (stated in the README's Quick start): each block is a script of its own, run in an
empty temporary folder with the repository on PYTHONPATH, offline. A block whose first line is
`# NAME.py — torchrun ...` is written to NAME.py and run as
`torchrun --standalone --nproc_per_node=2 NAME.py` (gloo on CPU).
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
TORCHRUN = re.compile(r"^# (\w+\.py) — torchrun ")


def readme_blocks() -> list:
    """(id, code) of every python block: id is the section heading above it and its line."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        prose = re.sub(r"^```.*?^```$", "", text[: m.start()], flags=re.S | re.M)  # no comments of code blocks
        heading = re.findall(r"^#+ (.+)$", prose, re.M)[-1]
        blocks.append((f"{re.sub(r'[^A-Za-z]+', '_', heading).strip('_')}@L{line}", m.group(1)))
    return blocks


BLOCKS = readme_blocks()


def test_readme_shows_the_examples_the_issue_asks_for():
    by_section = {}
    for block_id, code in BLOCKS:
        by_section.setdefault(block_id.split("@")[0], []).append(code)
    quick = "\n".join(by_section["Quick_start"])
    assert "from bench.gpt import GPT" in quick and "logits, loss = model(" in quick and '"h.*.attn.c_attn"' in quick
    assert "from transformers import" in quick and "mango.param_groups(model)" in quick  # an HF model, no hints
    hf_lightning = "\n".join(by_section["With_Hugging_Face_and_Lightning"])
    needles = ("optimizers=(opt, sched)", "resume_from_checkpoint=", "def configure_optimizers", "ckpt_path=",
               "mango.Mango(model, lr=", "mango.Mango(self, lr=")  # both recipes pass the model: real roles
    for needle in needles:
        assert needle in hf_lightning, needle
    assert sum(bool(TORCHRUN.match(code)) for _, code in BLOCKS) >= 2  # the DDP and FSDP scripts


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    torchrun = TORCHRUN.match(code)
    script = torchrun.group(1) if torchrun else "block.py"
    (tmp_path / script).write_text(code, encoding="utf-8")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    else:
        cmd = [sys.executable, script]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
