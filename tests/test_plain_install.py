"""What a plain install meets: the runtime dependencies are declared, and a missing package is
reported as a missing package (exit 1), never as a problem with the user's file."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "fixtures" / "adapters" / "sd1_kohya_lora.safetensors"


def test_runtime_imports_are_declared():
    """Every package lycotools imports at run time is a dependency, not an extra (matplotlib for
    --plot and bitsandbytes for 8-bit AdamW are the optional ones)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    imported = set()
    for py in (ROOT / "lycotools").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    third_party = {m for m in imported - stdlib if m != "lycotools"}
    aliases = {"PIL": "pillow", "yaml": "pyyaml"}
    optional = {"matplotlib", "bitsandbytes"}  # --plot; --optimizer adamw8bit (refused with one line without it)
    missing = {aliases.get(m, m) for m in third_party} - names - optional
    # Pillow, regex, huggingface_hub... come with diffusers/transformers; name them here when imported
    missing -= {"pillow", "huggingface_hub", "tokenizers"}
    assert not missing, f"imported at run time but not declared in [project].dependencies: {sorted(missing)}"


def _run_without(module: str, *args: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['lycotools', *{list(args)!r}]; "
            "from lycotools.cli import main; main()")
    env = dict(os.environ, LYCOTOOLS_NO_CACHE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_missing_package_is_not_blamed_on_the_file():
    r = _run_without("transformers", "inspect", str(ADAPTER))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1, r.stderr
    assert "not installed: transformers" in lines[0] and "pip install transformers" in lines[0]
    assert ADAPTER.name not in lines[0] and "internal error" not in lines[0]


def test_help_and_version_do_not_import_torch():
    """Start-up: --help and --version answer without importing torch (~1.4 s of the 2-core machine)."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lycotools.cli import main\n"
            "for args in (['--help'], ['--version'], ['inspect', '--help'], ['merge', '--help'], ['train', '--help']):\n"
            "    r = CliRunner().invoke(main, args)\n"
            "    assert r.exit_code == 0, (args, r.output)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
