"""Every link and section reference in the README, docs/ and the code resolves inside the repo."""
import re

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_markdown_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_section_references_in_code_exist():
    method = (ROOT / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", method, flags=re.M))
    for path in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")]:
        text = path.read_text()
        assert "SPEC" not in text, f"{path.name} points to a file outside the repo"
        for n in re.findall(r"docs/method\.md §(\d+)", text):
            assert n in sections, f"{path.name}: docs/method.md §{n} does not exist"
        for doc in re.findall(r"docs/([\w.-]+\.md)", text):
            assert (ROOT / "docs" / doc).is_file(), f"{path.name}: docs/{doc} does not exist"


def test_readme_is_short_and_indexes_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 220
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in readme, doc.name
