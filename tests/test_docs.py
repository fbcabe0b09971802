"""The documentation as a user follows it: every link leads somewhere, every command shown runs past its own
parser (flags and values), and the flag reference names every flag the commands have.

In-process: the parsers are the commands' own (train.py's derived from TrainConfig, infer.py's, prepare.py's).
"""

import re
import shlex
from pathlib import Path

import pytest

from helpers import ROOT
from vitfood.cli import infer_parser
from vitfood.config import TRAIN_EXAMPLES, TrainConfig, train_parser
from vitfood.prepare import build_parser as prepare_parser

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train.py": train_parser, "infer.py": infer_parser, "prepare.py": prepare_parser}
CONSOLE_SCRIPTS = {"vitfood-train": "train.py", "vitfood-infer": "infer.py", "vitfood-prepare": "prepare.py"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
SHELL_OPERATORS = {";", "&&", "||", "|", "&"}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a markdown page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    links = LINK.findall(page.read_text())
    for target in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not this repository's
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page_id(page)} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page_id(page)} links to {target}: no such heading"


def test_the_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page_id(page)}"


def shell_lines(text: str) -> list[str]:
    """The command lines of a page's code blocks (not ```python): continuations joined, a leading '$ ' dropped."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang.strip() not in ("", "sh", "bash", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            lines.append(line.strip().removeprefix("$ "))
    return lines


def commands(line: str) -> list[tuple[str, list[str]]]:
    """[(script, its arguments)] of each command on a shell line that runs one: `python X.py ...`,
    `torchrun ... train.py ...`, `vitfood-train ...`, `benchmarks/gpu_all.sh ...`. Other lines (the output
    shown, a folder tree) give none; redirections end a command's arguments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: printed output, not a command
        return []
    found, part = [], []
    for word in [*words, ";"]:
        if word not in SHELL_OPERATORS:
            part.append(word)
            continue
        if part:
            args = part[:next((i for i, w in enumerate(part) if w[0] in "<>"), len(part))]
            head = args[0]
            if head in ("python", "python3") and len(args) > 1 and args[1] not in ("-c", "-m"):
                found.append((args[1], args[2:]))
            elif head == "torchrun":
                script = next(i for i, w in enumerate(args) if w.endswith(".py"))
                found.append((args[script], args[script + 1:]))
            elif head in CONSOLE_SCRIPTS:
                found.append((CONSOLE_SCRIPTS[head], args[1:]))
            elif head.endswith((".py", ".sh")) and not head.endswith(":"):
                found.append((head, args[1:]))
        part = []
    return found


def check_command(script: str, args: list[str], where: str) -> None:
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    name = Path(script).name
    if name not in PARSERS:
        return
    try:
        parsed = PARSERS[name]().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: {name} refuses {shlex.join(args)!r} (the error is printed above)")
    if name == "train.py":
        TrainConfig(**vars(parsed)).validate()  # the values too: what train.py checks before it starts


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_shown_is_accepted_by_its_parser(page):
    shown = [c for line in shell_lines(page.read_text()) for c in commands(line)]
    for script, args in shown:
        check_command(script, args, page_id(page))
    if page.name == "README.md":  # the quick start shows both commands, and a user's own data
        scripts = [Path(s).name for s, _ in shown]
        assert "train.py" in scripts and "infer.py" in scripts
        assert any("--dataset" in args and "--model" in args for s, args in shown if s == "train.py")


def test_the_help_examples_are_accepted_too():
    for script, text in (("train.py", TRAIN_EXAMPLES), ("infer.py", infer_parser().epilog)):
        shown = [c for line in text.splitlines() for c in commands(line.split("   ")[0].strip())]
        assert len(shown) >= 3, f"{script} --help shows too few examples"
        for found, args in shown:
            check_command(found, args, f"{script} --help")


def test_the_commands_reader_finds_what_a_shell_would_run():
    assert commands("python train.py --epochs 3   # a comment") == [("train.py", ["--epochs", "3"])]
    assert commands("python infer.py photos/ --csv > out.csv") == [("infer.py", ["photos/", "--csv"])]
    assert commands("python a.py; python b.py --x") == [("a.py", []), ("b.py", ["--x"])]
    assert commands("torchrun --nproc_per_node 8 train.py --dataset d") == [("train.py", ["--dataset", "d"])]
    assert commands("prepare.py: downloading model x ...") == [] and commands("my_photos/  apple/") == []
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_command("train.py", ["--no-such-flag"], "here")
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_command("train.py", ["--epochs", "1.5"], "here")


def flags_of(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("page, script", [("training.md", "train.py"), ("inference.md", "infer.py")])
def test_the_flag_reference_names_every_flag_and_no_other(page, script):
    text = (ROOT / "docs" / page).read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(re.findall(r"`[^`]*`", text))))
    flags = flags_of(PARSERS[script]())
    assert not flags - named - {"--help"}, f"docs/{page} does not name {sorted(flags - named - {'--help'})}"
    assert not named - flags, f"docs/{page} names flags that {script} does not have: {sorted(named - flags)}"


def test_the_readme_keeps_the_install_and_test_commands_that_ci_runs():
    readme = shell_lines((ROOT / "README.md").read_text())
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in ("pip install -e '.[test]'", "python -m pytest -q -n 2", "python -m pytest -q -n 2 -m bench"):
        assert command in ci and any(line.split("#")[0].strip() == command for line in readme), command
    assert len((ROOT / "README.md").read_text().splitlines()) < 200  # a quick start; the reference is in docs/
