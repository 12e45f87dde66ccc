"""The docs cannot drift from the code: every command written in README.md and docs/*.md
(`python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...`, in code blocks and inline code) names a
script that exists (at the top level, or docs/figures.py) and only flags its --help lists; every
test the docs name exists, and each `python -m pytest FILE -k NAME` selects exactly the tests its
paragraph names; the README stays a newcomer's page; the import graph in docs/layout.md is the
code's."""
import ast
import contextlib
import fnmatch
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = ["README.md", *sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md")))]
SHELL_BREAKS = {"&&", "||", "|", ";", "#", ">", "2>&1"}
SCRIPT_DIRS = ("", "docs")  # where scripts live: the top level, and docs/figures.py


def code_spans(text):
    """The code of a markdown text: each line of its fenced blocks (lines ending in a backslash
    joined to the next), and each inline code span (line breaks inside it made spaces)."""
    spans, rest = [], []
    for i, part in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        if i % 2:  # inside a fence (the closing ``` ends the block)
            block, _, after = part.partition("```")
            spans += [line for line in block.replace("\\\n", " ").split("\n") if line.strip()]
            rest.append(after)
        else:
            rest.append(part)
    for span in re.findall(r"`([^`]+)`", "\n".join(rest)):
        spans.append(" ".join(span.split()))
    return spans


def commands(text):
    """[(script, [flags])] of every command in a markdown text that runs a script of this
    project: `python[3] SCRIPT.py ...`, `torchrun [--opts] SCRIPT.py ...`, or a span that starts
    with `SCRIPT.py --`. Flags are the `--name` tokens up to a shell separator."""
    found = []
    for span in code_spans(text):
        try:
            tokens = shlex.split(span, comments=True)
        except ValueError:  # an unbalanced quote in prose-like code: split on spaces
            tokens = span.split()
        for i, token in enumerate(tokens):
            if not re.fullmatch(r"[\w./-]+\.py", token):
                continue
            before = tokens[:i]
            runner = before[-1:] in (["python"], ["python3"]) or (
                "torchrun" in before and all(t.startswith("--") or t.isdigit()
                                             for t in before[before.index("torchrun") + 1:]))
            bare = i == 0 and len(tokens) > 1 and tokens[1].startswith("--")
            if not (runner or bare):
                continue
            args = []
            for t in tokens[i + 1:]:
                if t in SHELL_BREAKS:
                    break
                args.append(t)
            found.append((token, [a.split("=")[0] for a in args if re.fullmatch(r"--[\w-]+(=.*)?", a)]))
    return found


def help_flags(script):
    """The long flags a script's parser has (its actions' option strings), each of which its
    --help lists; a flag only named in another flag's explanation is not one."""
    import argparse
    name = os.path.basename(script)[:-3]
    if os.path.dirname(script) and not os.path.isabs(script):  # docs/figures.py: from its file
        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(name)
    parsers, out = [], io.StringIO()
    real = argparse.ArgumentParser.print_help

    def print_help(self, file=None):
        parsers.append(self)
        real(self, file)
    argparse.ArgumentParser.print_help = print_help
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.parse_args(["--help"])
    finally:
        argparse.ArgumentParser.print_help = real
    [parser] = parsers
    flags = {option for action in parser._actions if action.help != argparse.SUPPRESS
             for option in action.option_strings if option.startswith("--")}
    listed = set(re.findall(r"--[a-z][\w-]*", out.getvalue()))
    assert flags <= listed, (script, flags - listed)
    return flags


def problems(text):
    """One line for each command of `text` that names a missing script or an unknown flag."""
    found, known = [], {}
    for script, flags in commands(text):
        if not os.path.isfile(os.path.join(HERE, script)) or os.path.dirname(script) not in SCRIPT_DIRS:
            found.append(f"{script}: no such script")
            continue
        known.setdefault(script, help_flags(script))
        found += [f"{script} {flag}: not in its --help" for flag in flags
                  if flag not in known[script]]
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_in_the_docs_runs_a_script_with_flags_it_has(doc):
    with open(os.path.join(HERE, doc), encoding="utf-8") as f:
        text = f.read()
    assert commands(text) or doc != "README.md"
    assert problems(text) == [], doc


def test_the_check_catches_a_doc_line_with_an_unknown_flag():
    """A doc with a wrong flag, a missing script and good commands in every form: only the wrong
    ones are reported."""
    text = ("Run `python train.py --dataset mnist --lr 1e-3` or\n`python train.py --no-such-flag 3`.\n\n"
            "```bash\npip install -r requirements.txt && python sample.py --n 4 \\\n    --bogus 1\n"
            "torchrun --nproc_per_node=2 train.py --steps 5\npython missing.py --x\n```\n"
            "A table row: | `train.py --dataset mnist --stepz 9` |\n")
    assert sorted(problems(text)) == ["missing.py: no such script",
                                      "sample.py --bogus: not in its --help",
                                      "train.py --no-such-flag: not in its --help",
                                      "train.py --stepz: not in its --help"]
    assert ("train.py", ["--steps"]) in commands(text)


def test_the_figures_script_is_among_the_checked_commands():
    """docs/derivations.md shows the figures script's command, so the check above covers it."""
    with open(os.path.join(HERE, "docs", "derivations.md"), encoding="utf-8") as f:
        scripts = {script for script, _ in commands(f.read())}
    assert "docs/figures.py" in scripts
    assert problems("Run `python docs/figures.py --checkpoint c.pt --nope 1`.") == [
        "docs/figures.py --nope: not in its --help"]


def defined_tests():
    """{test file: names of its test functions}, from the source."""
    found = {}
    for path in glob.glob(os.path.join(HERE, "test_*.py")):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found[os.path.basename(path)] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                                         and n.name.startswith("test_")}
    return found


def selected(names, expression):
    """The names `pytest -k EXPRESSION` keeps, for an expression that is one name (a
    case-insensitive substring match, as pytest does for a bare word)."""
    assert re.fullmatch(r"\w+", expression), f"-k {expression}: only single names are checked"
    return {n for n in names if expression.lower() in n.lower()}


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_the_docs_name_exists(doc):
    """Each `test_...` in the code spans of a doc is a test function of some test file (a pattern,
    `test_1_*`, or a -k prefix, `test_1_`, matches at least one)."""
    with open(os.path.join(HERE, doc), encoding="utf-8") as f:
        text = f.read()
    tests = defined_tests()
    every, files = set().union(*tests.values()), {name[:-3] for name in tests}
    named = {token for span in code_spans(text) for token in re.findall(r"\btest_[\w*]+", span)
             if token not in files}
    missing = sorted(n for n in named if not fnmatch.filter(every, n + "*" if n.endswith("_") else n))
    assert missing == [], doc


def test_each_k_command_selects_the_tests_its_paragraph_names():
    """In docs/derivations.md, a paragraph with `python -m pytest FILE -k NAME` selects exactly the
    tests it names (none named: at least one selected); `-k test_1_` must not also run test_11_."""
    with open(os.path.join(HERE, "docs", "derivations.md"), encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    functions, checked = defined_tests(), 0
    for paragraph in paragraphs:
        text = " ".join(paragraph.split())
        for file, expression in re.findall(r"`python -m pytest (test_\w+\.py) -k (\w+)`", text):
            picked = selected(functions[file], expression)
            named = set(re.findall(r"`(test_\w+)`", text)) - {expression}
            assert picked == named if named else picked, (file, expression)
            checked += 1
    assert checked >= 14


@pytest.mark.parametrize("doc", DOCS)
def test_every_picture_and_page_the_docs_link_exists(doc):
    """Each relative link or image of a doc ([..](path), ![..](path)) names a file beside it."""
    with open(os.path.join(HERE, doc), encoding="utf-8") as f:
        text = f.read()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if not re.match(r"[a-z]+:|#", t)}
    base = os.path.dirname(os.path.join(HERE, doc))
    assert sorted(t for t in targets if not os.path.exists(os.path.join(base, t))) == [], doc


def test_a_flag_named_only_in_another_flag_s_help_is_not_known(tmp_path, monkeypatch):
    """A script whose one flag's explanation names --prose-only: a doc line with --prose-only
    is reported, a doc line with the real flag is not."""
    (tmp_path / "proseful.py").write_text(
        "import cli\n"
        "def parse_args(argv=None):\n"
        "    p = cli.ArgumentParser(description='a script')\n"
        "    p.add_argument('--real', help='like --prose-only, which this script does not have')\n"
        "    return p.parse_args(argv)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert help_flags(str(tmp_path / "proseful.py")) == {"--real", "--help"}


def test_the_readme_is_a_newcomers_page():
    """At most 8 KB; its first 40 lines give the set-up commands, a picture, and how to train,
    sample and evaluate."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.encode()) <= 8192
    head = "\n".join(text.split("\n")[:40])
    assert "pip install -r requirements.txt" in head and "python -m pytest" in head
    assert re.search(r"!\[[^\]]+\]\([^)]+\.png\)", head)
    for script in ("train.py", "sample.py", "evaluate.py"):
        assert f"python {script}" in head, script


def import_graph():
    """{module: sorted project modules it imports}, from the import statements."""
    names = {p[:-3] for p in os.listdir(HERE) if p.endswith(".py") and not p.startswith("test_")
             and p != "conftest.py"}
    graph = {}
    for name in names:
        with open(os.path.join(HERE, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module.split(".")[0])
        graph[name] = sorted((deps & names) - {name})
    return graph


def test_the_import_graph_in_the_docs_is_the_codes():
    with open(os.path.join(HERE, "docs", "layout.md"), encoding="utf-8") as f:
        text = f.read()
    written = {}
    for line in re.findall(r"^(\w+)\.py\s+-> (.*)$", text, flags=re.M):
        written[line[0]] = [] if line[1] == "nothing of the project" else line[1].split(", ")
    assert written == import_graph()
