"""The manual holds together: every relative link in README.md and docs/ resolves (its file, and
its #anchor when it names a heading of a Markdown page), every `ldm <subcommand>` the docs show
is a real subcommand whose `--help` answers, and no page cites a design file readers do not
have. Runs from the repository root: `pytest tests/unit/test_docs.py`."""

from functools import cache
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^ {0,3}(```|~~~)")
# [text](target "title") and ![alt](target); the target may sit in <...>
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
# `ldm SUB`, `.venv/bin/ldm SUB`: ldm as a word of its own, not ldm-serving, ldm.v1 or ldm_*
LDM_COMMAND = re.compile(r"(?:^|(?<=[\s;&|(`$]))(?:[\w./-]*/)?ldm[ \t]+([a-z][a-z0-9-]*)")
FORBIDDEN = ("../shared", "DESIGN.md")


def doc_files() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def split_code(text: str) -> tuple:
    """(prose lines, code lines) of a Markdown text, as [(line number, text)]; fenced code blocks
    and indented code blocks (4 spaces after a blank line) count as code."""
    prose, code = [], []
    fenced, indented, previous_blank = None, False, True
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fenced is not None:
            if match and match.group(1) == fenced:
                fenced = None
            else:
                code.append((number, line))
        elif match:
            fenced = match.group(1)
        elif line.startswith("    ") and (previous_blank or indented) and not line.lstrip().startswith(("-", "*", "|")):
            indented = True
            code.append((number, line))
        else:
            indented = False
            prose.append((number, line))
        previous_blank = not line.strip()
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen, found = {}, set()
    for _, line in prose:
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> list:
    """[(line number, target)] of the inline, image and reference links in the prose of `path`."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(line)]
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list:
    """'file:line: target (why)' for every relative link of `path` that does not resolve."""
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if root.resolve() not in (resolved, *resolved.parents):
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where} (no heading with that anchor)")
    return problems


def ldm_commands(path: Path) -> list:
    """[(line number, subcommand, command line)] of every `ldm SUB ...` shown in code blocks and
    code spans of `path`."""
    prose, code = split_code(path.read_text(encoding="utf-8"))
    snippets = list(code)
    for number, line in prose:
        snippets += [(number, m.group(2)) for m in CODE_SPAN.finditer(line)]
    return [(number, m.group(1), text.strip()) for number, text in snippets for m in LDM_COMMAND.finditer(text)]


@cache
def ldm_help(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def subcommands() -> set:
    result = ldm_help()
    assert result.returncode == 0, result.stderr
    match = re.search(r"\{([a-z0-9,-]+)\}", result.stdout)
    assert match, result.stdout
    return set(match.group(1).split(","))


SHOWN = sorted({sub for path in doc_files() for _, sub, _ in ldm_commands(path)})


def test_the_docs_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in doc_files()}
    assert {"README.md", "docs/README.md"} <= names
    assert SHOWN, "no `ldm` command found in the docs: the extraction is broken"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_readme_stays_short():
    """The README is read in five minutes; the details live in docs/ (issue 23)."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_the_index_links_every_page():
    index = ROOT / "docs" / "README.md"
    linked = {
        (index.parent / target.partition("#")[0]).resolve() for _, target in links(index) if not EXTERNAL.match(target)
    }
    pages = {
        path.resolve()
        for path in (ROOT / "docs").rglob("*.md")
        if path != index and (ROOT / "docs" / "results") not in path.parents
    }
    assert sorted(p.relative_to(ROOT).as_posix() for p in pages - linked) == []


def test_no_page_cites_a_design_file_readers_do_not_have():
    cited = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in [*doc_files(), ROOT / "pyproject.toml"]
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(word in line for word in FORBIDDEN)
    ]
    assert cited == []


@pytest.mark.parametrize("sub", SHOWN)
def test_every_ldm_command_shown_exists(sub):
    where = [
        f"{path.relative_to(ROOT)}:{number}: {text}"
        for path in doc_files()
        for number, shown, text in ldm_commands(path)
        if shown == sub
    ]
    assert sub in subcommands(), f"`ldm {sub}` is not a subcommand, shown at:\n" + "\n".join(where)
    result = ldm_help(sub)
    assert result.returncode == 0, f"`ldm {sub} --help` failed:\n{result.stderr[-2000:]}"


def test_every_flag_shown_is_in_the_help():
    """The `--flags` of each `ldm SUB ...` line in a code block are options of `ldm SUB`."""
    unknown = []
    for path in doc_files():
        _, code = split_code(path.read_text(encoding="utf-8"))
        lines, joined = [], ""
        for number, line in code:  # join shell continuation lines
            joined += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                lines.append((number, joined))
                joined = ""
        for number, line in lines:
            for match in LDM_COMMAND.finditer(line):
                sub = match.group(1)
                if sub not in subcommands():
                    continue  # test_every_ldm_command_shown_exists says so
                rest = line[match.end() :].split(" # ")[0]  # up to a shell comment
                rest = re.split(r"[;|&]|\bldm\b", rest)[0]  # up to the next command
                try:
                    words = shlex.split(rest, comments=True)
                except ValueError:
                    words = rest.split()
                options = set(re.findall(r"--[a-z0-9][a-z0-9-]*", ldm_help(sub).stdout))
                for word in words:
                    flag = word.split("=")[0]
                    if re.fullmatch(r"--[a-z0-9][a-z0-9-]*", flag) and flag not in options:
                        unknown.append(f"{path.relative_to(ROOT)}:{number}: ldm {sub} {flag}")
    assert unknown == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[ok](there.md) [ok](there.md#a-heading) [ok](#page) ![ok](there.md)\n"
        "[gone](missing.md) ![gone](img/missing.png) [bad anchor](there.md#nowhere)\n"
        "[outside](../../shared/DESIGN.md) [web](https://example.com/x.md)\n"
        "`[in code](missing-in-span.md)`\n\n```\n[in a block](missing-in-block.md)\n```\n"
    )
    problems = broken_links(page, tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md (no such file)",
        "img/missing.png (no such file)",
        "there.md#nowhere (no heading with that anchor)",
        "../../shared/DESIGN.md (outside the repository)",
    ]


def test_commands_are_read_from_code_only(tmp_path):
    path = tmp_path / "page.md"
    path.write_text(
        "Run `ldm serve --repo R` or `.venv/bin/ldm bench`; ldm serve in prose, ldm-serving and\n"
        "`ldm.v1.Images` are not commands.\n\n"
        "```bash\n.venv/bin/ldm export DIR \\\n  --repo model_repository   # ldm eval too\n```\n"
    )
    assert [sub for _, sub, _ in ldm_commands(path)] == ["export", "eval", "serve", "bench"]
