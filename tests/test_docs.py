"""The documentation cannot drift from the code.

Every command shown in README.md and in the usage pages of docs/ (``COMMAND_PAGES``) at least
composes its config, as ``python <script> --cfg job`` would; argparse tools must exist and know
every ``--option`` shown. README's test command is the one ``.ci/run`` runs, README stays short,
and the site builds with ``mkdocs build --strict`` (a broken link or heading anchor, a docstring
that names a parameter its function does not have: any warning fails).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import defectlab.experiment_log  # noqa: F401  (registers the ${sweep_id:} resolver of logger=wandb)

from .conftest import CONF, ROOT

pytestmark = pytest.mark.docs

README = ROOT / "README.md"
README_MAX_LINES = 250  # issue 23: a README a practitioner reads; the detail is in docs/
# Pages whose ```bash blocks are commands to copy. Benchmark pages are records of measurements at
# named commits (placeholders like <run>, optional [--flags]) and are not listed.
COMMAND_PAGES = [
    README,
    *sorted((ROOT / "docs" / "getting-started").glob("*.md")),
    *(
        ROOT / "docs" / page
        for page in (
            "data.md",
            "evaluation.md",
            "deployment.md",
            "defect-types.md",
            "sweeps.md",
            "configuration.md",
            "contributing.md",
            "methods/patchcore.md",
        )
    ),
]
# Hydra entry points and their configs in conf/.
HYDRA_SCRIPTS = {
    "train.py": "train",
    "evaluate.py": "evaluate",
    "predict.py": "predict",
    "export.py": "export",
    "app.py": "app",
    "classify_defects.py": "classify_defects",
}
HYDRA_MODULES = {"defectlab.eda": "eda"}
# python -m <module> commands that are not defectlab's (tests, the docs themselves).
OTHER_MODULES = {"pytest", "mkdocs", "venv", "pip"}
CFG_FLAGS = {"--cfg", "-c"}  # they take a value: job | hydra | all


def shell_commands(path: Path) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every command in the page's ```bash blocks (``&&`` splits, ``\\`` joins)."""
    commands, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            in_bash = not in_bash and fence.group(1) in ("bash", "sh", "shell")
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(pending + line, comments=True)
        pending = ""
        argv: list[str] = []
        for token in [*tokens, "&&"]:
            if token == "&&":
                if argv:
                    commands.append((start, argv))
                argv = []
            else:
                argv.append(token)
    return commands


def _python_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in COMMAND_PAGES:
        for line, argv in shell_commands(page):
            while argv and argv[0] in ("/usr/bin/time", "-v"):
                argv = argv[1:]
            if argv and argv[0] in ("python", "python3"):
                found.append((f"{page.relative_to(ROOT)}:{line}", argv[1:]))
    return found


COMMANDS = _python_commands()


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """Each sweep override (``a=1,2``) as its first value: one job's config."""
    parser = OverridesParser.create()
    single = []
    for text in overrides:
        override = parser.parse_override(text)
        if override.is_sweep_override():
            key = text.split("=", 1)[0]
            text = f"{key}={next(iter(override.sweep_string_iterator()))}"
        single.append(text)
    return single


def _compose_job(config: str, args: list[str]) -> None:
    """What ``--cfg job`` checks: the overrides apply and every value resolves."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in CFG_FLAGS:
            skip = True
        elif arg not in ("-m", "--multirun"):
            assert not arg.startswith("-"), f"unknown flag {arg} for a Hydra entry point"
            overrides.append(arg)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=_first_of_sweeps(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.choices.*}
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def _check_argparse_tool(source: Path, args: list[str]) -> None:
    """The script exists and declares every ``--option`` the command uses."""
    assert source.is_file(), f"{source} does not exist"
    text = source.read_text()
    for arg in args:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert f'"{option}"' in text, f"{source.name} has no option {option}"


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_composes(where, argv):
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        if module in OTHER_MODULES:
            return
        if module in HYDRA_MODULES:
            _compose_job(HYDRA_MODULES[module], args)
            return
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{where}: no module {module}"
        _check_argparse_tool(Path(spec.origin), args)
    elif argv[0] in HYDRA_SCRIPTS:
        _compose_job(HYDRA_SCRIPTS[argv[0]], argv[1:])
    elif argv[0].startswith("benchmarks/"):
        _check_argparse_tool(ROOT / argv[0], argv[1:])
    else:
        pytest.fail(
            f"{where}: python {argv[0]} is not a known entry point; teach tests/test_docs.py"
        )


def test_commands_are_found_in_every_page():
    """The extraction itself works: the pages that show commands yield them."""
    pages = {where.rsplit(":", 1)[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/getting-started/own-images.md"} <= pages
    readme = [argv for where, argv in COMMANDS if where.startswith("README.md")]
    assert sum(argv[0] == "train.py" for argv in readme) >= 10


def test_shell_commands_join_continuations_and_split_chains(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\npython3 -m venv .venv && python train.py a=1  # note\n"
        "python train.py -m b=1,2 \\\n    c=3\n```\n```text\npython not.py\n```\n"
    )
    assert shell_commands(page) == [
        (2, ["python3", "-m", "venv", ".venv"]),
        (2, ["python", "train.py", "a=1"]),
        (3, ["python", "train.py", "-m", "b=1,2", "c=3"]),
    ]


def test_readme_test_command_is_what_ci_runs():
    """.ci/run installs and runs exactly the README's test command."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_tests = [line for line in ci if line.startswith("python -m pytest")]
    assert len(ci_tests) == 1, ci_tests
    text = README.read_text()
    section = text[text.index("**2. Run the tests**") :]
    start = section.index("```bash") + len("```bash")
    block = section[start : section.index("```", start)]
    assert [line.strip() for line in block.strip().splitlines()] == ci_tests


def test_readme_links_reach_files():
    """README's relative links (to docs pages, GitHub renders them) point at files that exist."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if "://" not in t]
    assert len(local) >= 10
    assert [t for t in local if not (ROOT / t).is_file()] == []


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"


def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: ~5 s (the API pages read the source, nothing is imported)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "mkdocs build --strict failed (pip install -e '.[dev]' provides mkdocs):\n"
        + result.stdout
        + result.stderr
    )
    assert (tmp_path / "site" / "getting-started" / "own-images" / "index.html").is_file()
    reference = (tmp_path / "site" / "config-files" / "index.html").read_text()
    for path in CONF.rglob("*.yaml"):  # the hook lists every config file
        assert path.relative_to(ROOT).as_posix() in reference
