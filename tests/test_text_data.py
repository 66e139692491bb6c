"""Reading text inputs: labelled .tsv/.csv tables and unlabelled corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfkd_cli.errors import DfkdError
from dfkd_cli.text.data import read_corpus, read_text_table

CLASSES = ["negative", "positive"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(DfkdError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert message and "\n" not in message, message
    assert error.value.exit_code == 2
    return message


# ------------------------------------------------------------------------------------------ tables


def test_sst2_style_tsv_keeps_quotes_as_text(tmp_path: Path) -> None:
    # SST-2's TSV has no quoting: quote characters are part of the sentence.
    path = write(tmp_path / "dev.tsv", 'sentence\tlabel\nit \'s a "charming" , often affecting journey . \t1\n'
                                       '"unflinchingly bleak\t0\n\n')
    texts, labels = read_text_table(path, "sentence", "label", CLASSES)
    assert texts == ['it \'s a "charming" , often affecting journey .', '"unflinchingly bleak']
    assert labels == [1, 0]


def test_csv_quoted_fields_and_class_names_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.csv", 'id,text,label\n1,"hello, world",Positive\n2,"a ""quoted"" word\nacross lines",NEGATIVE\n'
                                       "3,plain,1\n4,floaty,0.0\n")
    texts, labels = read_text_table(path, "text", "label", CLASSES)
    assert texts == ["hello, world", 'a "quoted" word\nacross lines', "plain", "floaty"]
    assert labels == [1, 0, 1, 0]


def test_class_names_win_over_indices(tmp_path: Path) -> None:
    # Star ratings named "1".."3": the label "3" is the class named "3" (index 2), not index 3.
    path = write(tmp_path / "stars.csv", "text,stars\nmeh,1\nfine,2\ngreat,3\n")
    assert read_text_table(path, "text", "stars", ["1", "2", "3"])[1] == [0, 1, 2]


def test_no_label_column_limit_bom_and_case_insensitive_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffText,label\na,0\nb,1\nc,0\n".encode())
    texts, labels = read_text_table(path, "text", None, None, limit=2)
    assert texts == ["a", "b"] and labels is None
    assert read_text_table(path, "Text", "label", None) == (["a", "b", "c"], [0, 1, 0])


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in refused(read_text_table, tmp_path / "nope.tsv", "sentence", "label", CLASSES)


def test_unknown_extension_names_the_accepted_ones(tmp_path: Path) -> None:
    message = refused(read_text_table, write(tmp_path / "dev.json", "{}"), "sentence", "label", CLASSES)
    assert ".json" in message and ".tsv" in message and ".csv" in message


def test_missing_column_lists_columns_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\nfine film\t1\n")
    message = refused(read_text_table, path, "sentense", "label", CLASSES)
    assert "'sentence', 'label'" in message and "did you mean 'sentence'" in message
    message = refused(read_text_table, path, "sentence", "gold", CLASSES)
    assert "label column 'gold'" in message and "'sentence', 'label'" in message


@pytest.mark.parametrize("content", ["", "\n\n", "sentence\tlabel\n", "sentence\tlabel\n\n\n"])
def test_empty_tables(tmp_path: Path, content: str) -> None:
    message = refused(read_text_table, write(tmp_path / "dev.tsv", content), "sentence", "label", CLASSES)
    assert "empty" in message or "no rows" in message


def test_label_out_of_range_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t1\nbad\t2\n")
    message = refused(read_text_table, path, "sentence", "label", CLASSES)
    assert "line 3" in message and "label 2" in message and "0..1" in message
    assert "line 2" in refused(read_text_table, write(tmp_path / "neg.tsv", "sentence\tlabel\nx\t-1\n"),
                               "sentence", "label", None)


def test_unknown_class_name_names_the_line_and_classes(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.csv", "text,label\nfine,positive\nbad,negativ\n")
    message = refused(read_text_table, path, "text", "label", CLASSES)
    assert "line 3" in message and "'negativ'" in message and "did you mean 'negative'" in message
    # Without class names only integer labels can be understood.
    assert "integer" in refused(read_text_table, path, "text", "label", None)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dev.tsv"
    path.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    message = refused(read_text_table, path, "sentence", "label", CLASSES)
    assert "UTF-8" in message and "line 2" in message


def test_empty_text_and_empty_label_cells(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\nfine\t1\n  \t0\n")
    message = refused(read_text_table, path, "sentence", "label", CLASSES)
    assert "line 3" in message and "empty" in message
    path = write(tmp_path / "nolabel.tsv", "sentence\tlabel\nfine\t\n")
    assert "label is empty" in refused(read_text_table, path, "sentence", "label", CLASSES)


def test_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", "sentence\tlabel\na tab\there\t1\n")
    message = refused(read_text_table, path, "sentence", "label", CLASSES)
    assert "line 2" in message and "3 fields" in message


# ------------------------------------------------------------------------------------------ corpora


WIKI = """ = Valkyria Chronicles III = 

 Senjō no Valkyria 3 is a tactical role @-@ playing video game developed by Sega . 

 = = Gameplay = = 

 Too short .
 The game was released in January 2011 in Japan . It is the third game in the series . Hi .
"""


def test_wikitext_headings_blank_and_short_lines_dropped(tmp_path: Path) -> None:
    texts = read_corpus(write(tmp_path / "wiki.train.raw", WIKI), min_words=4, max_words=64)
    assert texts == [
        "Senjō no Valkyria 3 is a tactical role-playing video game developed by Sega .",
        "The game was released in January 2011 in Japan . It is the third game in the series . Hi .",
    ]


def test_long_lines_split_at_sentence_ends(tmp_path: Path) -> None:
    texts = read_corpus(write(tmp_path / "c.txt", WIKI), min_words=3, max_words=12)
    assert "The game was released in January 2011 in Japan ." in texts
    assert "It is the third game in the series ." in texts
    assert "Hi ." not in texts  # a sentence shorter than min_words
    assert all(len(text.split()) <= 12 for text in texts)


def test_sentence_longer_than_max_words_is_chunked_evenly(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(25)]
    texts = read_corpus(write(tmp_path / "c.txt", " ".join(words) + "\n"), min_words=3, max_words=10)
    assert [len(text.split()) for text in texts] == [9, 9, 7]
    assert " ".join(texts).split() == words


def test_sentence_ends_after_closing_quotes(tmp_path: Path) -> None:
    line = 'He said "it works." Then he left the room quietly! Did she follow him there? Nobody knows why.'
    texts = read_corpus(write(tmp_path / "c.txt", line), min_words=2, max_words=8)
    assert texts == ['He said "it works."', "Then he left the room quietly!", "Did she follow him there?", "Nobody knows why."]


def test_folder_of_txt_files_recursively_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "b.txt", "second file has words\n")
    write(tmp_path / "a.txt", "first file has words\n")
    write(tmp_path / "sub" / "c.txt", "third file has words\n")
    write(tmp_path / "notes.md", "ignored markdown file here\n")
    assert read_corpus(tmp_path) == ["first file has words", "second file has words", "third file has words"]


def test_corpus_errors(tmp_path: Path) -> None:
    assert "not found" in refused(read_corpus, tmp_path / "nope.txt")
    assert "empty" in refused(read_corpus, write(tmp_path / "empty.txt", "\n  \n"))
    assert "no usable lines" in refused(read_corpus, write(tmp_path / "short.txt", " = Title = \nhi\nok then\n"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good words here\n\xff\xfe broken\n")
    message = refused(read_corpus, bad)
    assert "UTF-8" in message and "line 2" in message
    (tmp_path / "nothing").mkdir()
    assert ".txt" in refused(read_corpus, tmp_path / "nothing")
