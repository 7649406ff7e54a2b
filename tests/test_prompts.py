"""Prompt sets: built-in .txt sets, the shipped PartiPrompts table (`parti`), CSV/TSV specs
(`FILE.csv:COLUMN?COL=V1|V2;COL2=V3`) and their one-line errors."""

import hashlib
import re

import pytest

from diffusion import PROMPTS_DIR, load_prompts

PARTI = PROMPTS_DIR / "PartiPrompts.tsv"


def parti_rows():
    """PartiPrompts.tsv re-read independently of load_prompts: plain splitting on newlines and tabs."""
    lines = PARTI.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == ""  # ends with a newline
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:-1]]
    assert header == ["Prompt", "Category", "Challenge", "Note"]
    assert all(len(r) == 4 for r in rows) and len(rows) == 1632
    return rows


# A DrawBench-like CSV (DrawBench itself is not shipped): the sheet's header, quoted prompts with
# commas, and the "Gary Marcus et al. " category with its trailing space, as in every public copy.
DRAWBENCH = [
    ("A red colored car.", "Colors"),
    ("A black colored banana.", "Colors"),
    ("A horse riding an astronaut.", "Conflicting"),
    ("A pizza cooking an oven.", "Conflicting"),
    ("A panda making latte art.", "Conflicting"),
    ("One cat and two dogs sitting on the grass.", "Counting"),
    ("A pear cut into seven pieces arranged in a ring.", "Gary Marcus et al. "),
    ("A tomato has been put on top of a pumpkin on a kitchen stool, with a fork.", "Gary Marcus et al. "),
    ("A hair drier underneath a sink.", "Gary Marcus et al. "),
    ("A couple of glasses are sitting on a table.", "Positional"),
    ("A fluffy baby sloth with a knitted hat trying to figure out a laptop, close up.", "Reddit"),
    ("An old photograph of a 1920s airship shaped like a pig, floating over a wheat field.", "Reddit"),
    ('A sign that says "Deep Learning".', "Text"),
]
CHALLENGING = [p for p, c in DRAWBENCH if c.strip() in ("Conflicting", "Gary Marcus et al.", "Reddit")]


@pytest.fixture
def drawbench(tmp_path):
    def quote(s):
        return '"' + s.replace('"', '""') + '"'

    f = tmp_path / "drawbench.csv"
    f.write_bytes(("Prompts,Category\r\n" + "".join(f"{quote(p)},{c}\r\n" for p, c in DRAWBENCH)).encode())
    return f


def test_parti_is_the_150_imagination_prompts():
    rows = parti_rows()
    imagination = [r[0] for r in rows if r[2] == "Imagination"]
    assert len(imagination) == 150
    assert load_prompts("parti") == imagination
    # "Imagination" is the only Challenge with exactly 150 prompts (our reading of the paper's "150 challenging").
    challenges = [r[2] for r in rows]
    assert [c for c in set(challenges) if challenges.count(c) == 150] == ["Imagination"]


def test_parti_ships_with_licence_and_source():
    assert (
        hashlib.sha256(PARTI.read_bytes()).hexdigest()
        == "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb"
    )
    assert "Apache License" in (PROMPTS_DIR / "PartiPrompts.LICENSE").read_text()
    note = (PROMPTS_DIR / "PartiPrompts.README.md").read_text()
    assert "google-research/parti" in note and "PartiPrompts.LICENSE" in note and "../shared" not in note


def test_builtin_names_list_parti():
    with pytest.raises(
        FileNotFoundError,
        match=r"--prompts 'no_such_set' is neither a built-in prompt set \(.*\bparti\b.*\) nor a file",
    ):
        load_prompts("no_such_set")


def test_txt_sets_unchanged(tmp_path):
    names = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))
    assert {"animals_activities", "simple_animals", "unseen_animals", "unseen_animals_activities"} <= set(names)
    for name in names:  # the same as reading the file by hand: stripped lines, blank ones skipped
        lines = (PROMPTS_DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        assert load_prompts(name) == [line.strip() for line in lines if line.strip()], name
    assert [
        len(load_prompts(n))
        for n in ("simple_animals", "animals_activities", "unseen_animals", "unseen_animals_activities")
    ] == [45, 135, 6, 18]
    f = tmp_path / "p.txt"
    f.write_text("a café\n\n  a dog  \n", encoding="utf-8")
    assert load_prompts(str(f)) == ["a café", "a dog"]


def test_hash_lines_in_a_text_file_are_comments(tmp_path):
    """A line whose first non-blank character is # is skipped; a # elsewhere belongs to the prompt."""
    f = tmp_path / "p.txt"
    f.write_text("# animals, v2\n\na cat\n   # indented note\n\ta dog #cute\n#\n  a horse  \n", encoding="utf-8")
    assert load_prompts(str(f)) == ["a cat", "a dog #cute", "a horse"]


def test_a_text_file_of_only_comments_is_an_error(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("# prompts to write later\n\n   # one more note\n", encoding="utf-8")
    one_line_error(
        ValueError,
        str(f),
        "--prompts",
        r"--prompts file '.*notes\.txt' has no prompts: write one prompt per line \(lines starting with # are comments\)$",
    )


def test_column_selection():
    rows = parti_rows()
    spec = str(PARTI)
    assert load_prompts(spec) == [r[0] for r in rows]  # no ':COLUMN': the column named Prompt
    assert load_prompts(spec + ":Prompt") == [r[0] for r in rows]
    assert load_prompts(spec + ":Category") == [r[1] for r in rows]
    assert load_prompts(spec + ":Note") == [r[3] for r in rows if r[3].strip()]  # empty cells are skipped
    # TSV is read without quoting: the prompt that starts with '"' keeps its quotes; spaces are kept verbatim.
    assert any(p.startswith('"G I G G L E"') for p in load_prompts(spec))
    assert any(p != p.strip() for p in load_prompts(spec))


def test_relative_file_falls_back_to_prompts_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_prompts("PartiPrompts.tsv:Prompt?Challenge=Imagination") == load_prompts("parti")
    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tChallenge\nmine\tImagination\n")
    assert load_prompts("PartiPrompts.tsv:Prompt?Challenge=Imagination") == ["mine"]  # the working directory first
    assert len(load_prompts("parti")) == 150  # a built-in name always reads prompts/


def test_filters_multiple_values_and_columns():
    rows = parti_rows()
    got = load_prompts("PartiPrompts.tsv:Prompt?Category=Food & Beverage;Challenge=Basic|Complex")
    want = [r[0] for r in rows if r[1] == "Food & Beverage" and r[2] in ("Basic", "Complex")]
    assert got == want and 0 < len(want) < len([r for r in rows if r[1] == "Food & Beverage"])
    assert load_prompts("PartiPrompts.tsv?Challenge=Writing & Symbols|Quantity") == [
        r[0] for r in rows if r[2] in ("Writing & Symbols", "Quantity")
    ]


def test_drawbench_challenging(drawbench):
    spec = f"{drawbench}:Prompts?Category=Conflicting|Gary Marcus et al.|Reddit"
    assert load_prompts(spec) == CHALLENGING and len(CHALLENGING) == 8
    # the filter value may carry the trailing space too; the column may be left to default
    assert load_prompts(f"{drawbench}?Category=Conflicting|Gary Marcus et al. |Reddit") == CHALLENGING
    assert load_prompts(f"{drawbench}:Prompts?Category=Gary Marcus et al.") == [
        p for p, c in DRAWBENCH if c.startswith("Gary")
    ]
    assert load_prompts(f"{drawbench}:Category?Category=Colors") == ["Colors", "Colors"]
    assert load_prompts(str(drawbench))[-1] == 'A sign that says "Deep Learning".'  # CSV quoting undone
    with pytest.raises(
        ValueError,
        match=r"no row .* has Category in \['Gary Marcus'\]; the values of Category: .*'Gary Marcus et al\.'",
    ):
        load_prompts(f"{drawbench}?Category=Gary Marcus")  # exact match, no prefixes


def one_line_error(exc, spec, flag, match):
    with pytest.raises(exc) as info:
        load_prompts(spec, flag)
    msg = str(info.value)
    assert msg.startswith(flag + " ") and "\n" not in msg, msg
    assert re.search(match, msg), msg
    return msg


def test_errors(tmp_path, drawbench):
    flag = "--eval-prompts"
    msg = one_line_error(
        ValueError, f"{drawbench}:Prompt", flag, r"has no column 'Prompt'; its columns: 'Prompts', 'Category'"
    )
    assert str(drawbench) in msg
    one_line_error(ValueError, f"{drawbench}?Kind=Reddit", flag, r"has no column 'Kind'")
    msg = one_line_error(
        ValueError, f"{drawbench}?Category=Nope|Other", flag, r"no row of .* has Category in \['Nope', 'Other'\]"
    )
    assert all(repr(c.strip()) in msg for _, c in DRAWBENCH)
    one_line_error(
        ValueError,
        f"{drawbench}?Category=Colors;Prompts=A horse riding an astronaut.",
        flag,
        r"among the rows with Category=Colors: 'A black colored banana.', 'A red colored car.'$",
    )
    many = tmp_path / "many.csv"
    many.write_text("prompt,k\n" + "".join(f"p{i},v{i:02d}\n" for i in range(30)))
    msg = one_line_error(ValueError, f"{many}?k=zz", flag, r"the values of k: 'v00', .* 'v19', \.\.\. \(30 in all\)$")
    assert "'v20'" not in msg
    one_line_error(ValueError, f"{many}:prompt?k", flag, r"filter 'k' is not COLUMN=VALUE")
    one_line_error(
        FileNotFoundError, str(tmp_path / "none.csv") + ":Prompts", flag, r"file '.*none\.csv' does not exist"
    )
    (tmp_path / "two.csv").write_text("Prompt,prompts\na,b\n")
    one_line_error(
        ValueError,
        str(tmp_path / "two.csv"),
        flag,
        r"name the prompt column as FILE:COLUMN; columns of .*: 'Prompt', 'prompts'",
    )


def test_empty_files(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    one_line_error(ValueError, str(tmp_path / "empty.csv"), "--source", r"file '.*empty\.csv' is empty")
    (tmp_path / "blank.tsv").write_text("\n\n")
    one_line_error(ValueError, str(tmp_path / "blank.tsv") + ":Prompt", "--source", r"is empty")
    (tmp_path / "header.csv").write_text("Prompts,Category\n")
    one_line_error(ValueError, str(tmp_path / "header.csv"), "--source", r"has no prompts in column 'Prompts'")
    (tmp_path / "empty.txt").write_text("\n \n")
    one_line_error(
        ValueError,
        str(tmp_path / "empty.txt"),
        "--source",
        r"file '.*empty\.txt' has no prompts: write one prompt per line",
    )


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.csv", "latin1.tsv"])
def test_non_utf8(tmp_path, name):
    f = tmp_path / name
    f.write_bytes("Prompt\nun café\n".encode("latin-1"))
    spec = str(f) + (":Prompt" if name.endswith("tsv") else "")
    one_line_error(
        ValueError,
        spec,
        "--prompts",
        rf"--prompts file '{re.escape(str(f))}' is not UTF-8 text \(byte 0xe9 at offset 13\): re-save it as UTF-8$",
    )


def test_utf8_bom_and_crlf(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffPrompts,Category\r\nune crème brûlée,Food\r\n".encode("utf-8"))
    assert load_prompts(f"{f}?Category=Food") == ["une crème brûlée"]
