"""The README's command examples use only options the commands have (so the docs cannot drift)."""

import re
import shlex
from pathlib import Path

import pytest

from lycotools.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[list[str]]:
    """Every `lycotools <command> ...` invocation in the README's bash blocks, as argument lists."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if "lycotools" in words:
                    out.append(words[words.index("lycotools") + 1:])
                elif words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("lycotools"):
                    out.append(words[3:])
    return out


def _option_names(cmd) -> set[str]:
    names = set()
    for p in cmd.params:
        names.update(getattr(p, "opts", ())), names.update(getattr(p, "secondary_opts", ()))
    return names | {"--help", "-h"}


EXAMPLES = _examples()


def test_readme_has_an_example_of_every_command():
    assert {e[0] for e in EXAMPLES} >= set(main.commands), sorted(set(main.commands) - {e[0] for e in EXAMPLES})


@pytest.mark.parametrize("args", EXAMPLES, ids=[" ".join(e)[:60] for e in EXAMPLES])
def test_readme_example_uses_real_options(args):
    assert args and args[0] in main.commands, f"unknown command {args[:1]}"
    known = _option_names(main.commands[args[0]])
    used = {a.split("=")[0] for a in args[1:] if a.startswith("-") and not re.fullmatch(r"-\d.*", a)}
    assert used <= known, f"{args[0]}: unknown options {sorted(used - known)}"
