"""Every ```python block of README.md and docs/*.md runs as written, and every relative link resolves.

Convention (stated in the README's Quick start): each block is a script of its own, run in an
empty temporary folder with the repository on PYTHONPATH, offline. A block whose first line is
`# NAME.py — torchrun ...` is written to NAME.py and run as
`torchrun --standalone --nproc_per_node=2 NAME.py` (gloo on CPU).
"""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
TORCHRUN = re.compile(r"^# (\w+\.py) — torchrun ")


PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
        return fh.read()


def _prose(text: str) -> str:
    """The page without its fenced code blocks (their comments are not headings, their text no links)."""
    return re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)


def page_blocks(page: str) -> list:
    """(id, code) of every python block of a page: id is the page (for docs/), the section heading
    above the block and its line."""
    text = _read(page)
    prefix = "" if page == "README.md" else os.path.splitext(os.path.basename(page))[0] + ":"
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        heading = re.findall(r"^#+ (.+)$", _prose(text[: m.start()]), re.M)[-1]
        blocks.append((f"{prefix}{re.sub(r'[^A-Za-z]+', '_', heading).strip('_')}@L{line}", m.group(1)))
    return blocks


def readme_blocks() -> list:
    return page_blocks("README.md")


def anchors(page: str) -> set:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", _prose(_read(page)), re.M)}


BLOCKS = [b for page in PAGES for b in page_blocks(page)]


def _by_section(page: str) -> dict:
    by_section = {}
    for block_id, code in page_blocks(page):
        by_section.setdefault(block_id.split("@")[0], []).append(code)
    return {k: "\n".join(v) for k, v in by_section.items()}


def test_readme_shows_the_examples_a_new_user_needs():
    quick = _by_section("README.md")["Quick_start"]
    assert "from bench.gpt import GPT" in quick and "logits, loss = model(" in quick and '"h.*.attn.c_attn"' in quick
    assert "from transformers import" in quick and "mango.param_groups(model)" in quick  # an HF model, no hints
    for needle in ("optimizers=(opt, sched)", "def configure_optimizers", "mango.Mango(model, lr=", "mango.Mango(self, lr="):
        assert needle in quick, needle  # HF Trainer and Lightning, each passing the model: real roles
    recipes = _by_section(os.path.join("docs", "guide.md"))["guide:With_Hugging_Face_and_Lightning"]
    for needle in ("optimizers=(opt, sched)", "resume_from_checkpoint=", "def configure_optimizers", "ckpt_path=",
                   "mango.Mango(model, lr=", "mango.Mango(self, lr="):
        assert needle in recipes, needle  # the full recipes resume from a checkpoint
    assert sum(bool(TORCHRUN.match(code)) for _, code in BLOCKS) >= 2  # the DDP and FSDP scripts


def test_readme_is_a_front_page_and_docs_say_what_they_hold():
    readme = _read("README.md")
    assert len(readme) <= 20_000, f"README.md is {len(readme)} characters"
    for page in ("guide", "architectures", "distributed", "design", "benchmarks", "report"):
        assert f"(docs/{page}.md)" in readme, f"the README's map of docs/ misses {page}.md"
        body = _read(os.path.join("docs", f"{page}.md")).split("\n")
        assert body[0].startswith("# ") and "What you will find here" in "\n".join(body[1:4]), page


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    """Every relative link of README.md and docs/ names a file of the repository, and an anchor a heading of it."""
    broken = []
    for target in LINK.findall(_prose(_read(page))):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, dest)):
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest})")
    assert not broken, f"{page}: broken links: {broken}"


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
