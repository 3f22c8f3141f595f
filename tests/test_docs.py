"""The repository explains itself and stands alone.

- No tracked file points outside the repository: no absolute path of the machine it was written on,
  no sibling folder of it, no notes a user does not have.
- Every relative link in README.md and docs/*.md reaches a file of the repository, and a `#anchor`
  a heading (or an explicit `<a id>`) of that file. Two pages are written on another branch and
  allowed by name until they land.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# pages another branch writes (the model-family seam and the network-module contract); linked already
PENDING_PAGES = {"docs/model_families.md", "docs/network_module.md"}

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
ANCHOR_TAG = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the ignored kinds
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not {".git", ".venv", ".cache", "__pycache__", "test-artifacts"} & set(p.relative_to(REPO).parts)]
    return [REPO / n for n in names if (REPO / n).is_file()]


def outside_markers() -> list[str]:
    """Text that means a file points outside the repository. Written in pieces, so that this file
    does not match itself."""
    # the repository's own location, not its parent: a clone in /tmp/x must not flag every "/tmp/"
    markers = {str(REPO), "/" + "work/", ".." + "/shared", "shared" + "/reference",
               "seed" + "-systems", "lora" + "-format.md", "seed" + " guide"}
    home = str(Path.home())
    if home not in ("/", ""):
        markers.add(home + "/")
    return sorted(markers)


def outside_references(files, markers) -> list[str]:
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for number, line in enumerate(text.splitlines(), 1):
            for marker in markers:
                if marker in line:
                    found.append(f"{path.relative_to(REPO)}:{number}: {marker!r} in: {line.strip()[:120]}")
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*|__", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    found, seen, in_code = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        found.update(ANCHOR_TAG.findall(line))
        match = None if in_code else HEADING.match(line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links_of(path: Path) -> list[tuple[int, str]]:
    out, in_code = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            out += [(number, target) for target in LINK.findall(re.sub(r"`[^`]*`", "", line))]
    return out


def broken_links(pages) -> list[str]:
    problems = []
    for page in pages:
        for number, target in links_of(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)}:{number}: ({target})"
            try:
                rel = dest.relative_to(REPO).as_posix()
            except ValueError:
                problems.append(f"{where} leaves the repository")
                continue
            if rel in PENDING_PAGES and not dest.exists():
                continue
            if not dest.exists():
                problems.append(f"{where} -> {rel} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
                problems.append(f"{where} -> no heading '#{anchor}' in {rel}")
    return problems


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_no_tracked_file_points_outside_the_repository():
    found = outside_references(tracked_files(), outside_markers())
    assert not found, "files point outside the repository (put what users need into docs/):\n" + "\n".join(found)


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading():
    pages = doc_pages()
    assert len(pages) > 10 and (REPO / "docs" / "development.md") in pages
    problems = broken_links(pages)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_is_a_first_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
    # every entry script has its row in "Which script do I run"
    scripts = sorted(p.name for p in REPO.glob("*.py")) + sorted(
        f"{folder}/{p.name}" for folder in ("networks", "finetune") for p in (REPO / folder).glob("*.py")
        if "__main__" in p.read_text(encoding="utf-8"))
    table = text.split("## Which script do I run", 1)[1].split("\n## ", 1)[0]
    missing = [s for s in scripts if f"`{s}" not in table]
    assert not missing, f"scripts without a row in the README's table: {missing}"


def test_the_checks_catch_what_they_claim(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Two words\n\n<a id=\"here\"></a>\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#two-words) [ok](docs/a.md#here) [ok](docs/model_families.md) [web](https://x.org)\n"
        "`[not a link](nowhere.md)`\n```\n[in code](nowhere.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#three) [out](../x.md)\n")
    assert broken_links([tmp_path / "README.md"]) == [
        "README.md:6: (docs/b.md) -> docs/b.md does not exist",
        "README.md:6: (docs/a.md#three) -> no heading '#three' in docs/a.md",
        "README.md:6: (../x.md) leaves the repository"]
    (tmp_path / "x.py").write_text('"""See ' + "/" + 'work/shared/notes.md."""\n')
    assert len(outside_references([tmp_path / "x.py"], outside_markers())) == 1


@pytest.mark.parametrize("heading, anchor", [
    ("Loading the results", "loading-the-results"),
    ("Inpainting ControlNet from COCO", "inpainting-controlnet-from-coco"),
    ("train_network.py: LoRA and LoCon `training`", "train_networkpy-lora-and-locon-training"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor
