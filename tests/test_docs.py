"""docs/adding-a-kernel.md stays true: a snippet that names a file appears in it
verbatim, and a snippet marked ``run`` runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding-a-kernel.md"
FENCE = re.compile(r"^```(\w+) (file=(\S+)|run)\n(.*?)^```$", re.S | re.M)


def _snippets():
    return [(m.group(3), m.group(4)) for m in FENCE.finditer(DOC.read_text())]


def test_every_code_block_is_checked():
    blocks = re.findall(r"^```", DOC.read_text(), re.M)
    assert len(blocks) == 2 * len(_snippets()), "a code block without file=... or run is not checked"


@pytest.mark.parametrize(
    "path,code", [s for s in _snippets() if s[0]], ids=lambda v: v if isinstance(v, str) and "/" in v else ""
)
def test_quoted_code_is_in_its_file(path, code):
    assert code in (ROOT / path).read_text(), f"the snippet quoted from {path} is no longer in it"


@pytest.mark.parametrize("code", [c for p, c in _snippets() if not p])
def test_runnable_snippets_run(code):
    exec(compile(code, str(DOC), "exec"), {})
