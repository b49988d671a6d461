"""The guide's hook order is the order fit, evaluate and predict really run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import torcheras
from torcheras.callbacks import Callback

GUIDE = Path(__file__).parent.parent / "docs" / "guide" / "hook-order.md"


def recorded_order() -> str:
    seen: list[tuple[str, object]] = []

    class Trace(Callback):
        pass

    def recorder(name: str):
        def hook(self, *args, **kwargs):
            seen.append((name, args[0] if args and isinstance(args[0], int) else ""))

        return hook

    for name in dir(Callback):
        if name.startswith("on_") and name not in ("on_batch_begin", "on_batch_end"):
            setattr(Trace, name, recorder(name))
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = torcheras.Model(torch.nn.Linear(4, 2))
    model.compile("sgd", "sparse_categorical_crossentropy", device="cpu")
    model.fit(x, y, epochs=2, batch_size=32, validation_split=0.25, verbose=0, callbacks=[Trace()])
    model.evaluate(x, y, verbose=0, callbacks=[Trace()])
    model.predict(x[:8], verbose=0, callbacks=[Trace()])
    return "\n".join(f"{name} {arg}" for name, arg in seen)


def test_the_documented_hook_order_is_the_real_one():
    block = re.search(r"```text\n(.*?)```", GUIDE.read_text(), re.S)
    assert block is not None
    documented = "\n".join(line.rstrip() for line in block.group(1).strip().splitlines())
    real = "\n".join(line.rstrip() for line in recorded_order().splitlines())
    assert documented == real


ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_no_page_installs_torcheras_from_pypi():
    """torcheras is not published: ``pip install torcheras`` fails, or fetches another
    project's package. The install page says how: a clone, the repository, or the wheel."""
    from_pypi = re.compile(r"pip install\s+['\"]?torcheras(\[[^\]]*\])?(?=['\"`\s]|$)(?!\s*@)")
    found = [
        f"{page.relative_to(ROOT)}: {m.group(0)}"
        for page in PAGES
        for m in from_pypi.finditer(page.read_text(encoding="utf-8"))
    ]
    assert found == []
    install = (ROOT / "docs" / "index.md").read_text(encoding="utf-8").split("## Install")[1]
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert "pip install -e ." in install and "make dist" in install
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert f"dist/torcheras-{version.group(1)}-py3-none-any.whl" in install


def _repo_files() -> tuple[set[Path], set[str]]:
    skip = {".git", ".venv", "site", "build", "dist", "node_modules"}
    files = {
        p
        for p in ROOT.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
    }
    return files, {p.name for p in files}


def test_every_repo_file_a_page_links_or_names_exists():
    """A relative link must reach a file of the repository, and a file a page names in code
    (``examples/gan.py``, ``CHANGELOG.md``) must be one: a reader following it finds it."""
    files, names = _repo_files()
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            target = target.split("#")[0]
            local = target and "://" not in target and not target.startswith("mailto:")
            if local and (page.parent / target).resolve() not in files:
                missing.append(f"{page.relative_to(ROOT)} links {target}")
        for name in re.findall(r"`([\w./-]+\.(?:md|py|toml|yml|yaml|sh|cfg))`", text):
            found = (ROOT / name).is_file() if "/" in name else name in names
            if not found:
                missing.append(f"{page.relative_to(ROOT)} names {name}")
    assert missing == []


def test_no_page_calls_the_outputs_of_predict_probabilities():
    """``predict`` returns what the network returns: logits for a network compiled with a
    cross-entropy name (which takes logits). The softmax is the reader's to apply."""
    wrong = re.compile(r"prob\w*\s*=\s*[\w.]*predict\(", re.I)
    found = [
        f"{page.relative_to(ROOT)}: {m.group(0)}"
        for page in PAGES
        for m in wrong.finditer(page.read_text(encoding="utf-8"))
    ]
    assert found == []
