"""annotations/transvg_splits.py: TransVG's split files are read as plain data only, every entry becomes an item by
TransVG's rules or is refused (or skipped and counted with --drop_invalid), and a split with nothing left says so.

Run: python -m pytest -q tests/test_annotations_transvg_splits.py
(Each dataset's format and the samples it gives: tests/test_data.py.)
"""
import pytest
from test_data import FORMATS, fabricate, make_split, open_split


class NotPlainData:  # a pickled instance of this makes a split file that needs more than plain data
    pass


def test_split_files_are_never_unpickled_unrestricted(tmp_path, word_tok):
    make_split(tmp_path, "referit", "val", [("a.jpg", "", [1, 1, 5, 5], "x", NotPlainData())])
    with pytest.raises(ValueError, match="never unpickled unrestricted"):
        open_split(tmp_path, "referit", "val", word_tok)
    make_split(tmp_path, "referit", "val", {"not": "a list"})
    with pytest.raises(ValueError, match="expected a list"):
        open_split(tmp_path, "referit", "val", word_tok)
    (tmp_path / "splits" / "referit" / "referit_val.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read split file"):
        open_split(tmp_path, "referit", "val", word_tok)


@pytest.mark.parametrize("bad, why", [
    (("a.jpg", 0, [1.0, 1.0, 0.7, 9.0], "x", []), "zero-area box"),  # width truncates to 0
    (("a.jpg", 0, [1, 1, 5, 5], "   ", []), "empty expression"),
    (("a.jpg", 0, [1, 1, 5, 5], "\U0001f600\u200b !!", []), "expression without a word"),  # emoji, control, punct.
    (("a.jpg", 0, [1, 1, 5], "x", []), "box must be 4 finite numbers"),
    (("a.jpg", [1, 1, 5, 5], "x"), "expected a 5-tuple"),
    ((None, 0, [1, 1, 5, 5], "x", []), "img_file and phrase must be strings"),
])
def test_invalid_entries(bad, why, tmp_path, word_tok):
    fabricate(tmp_path, "refcoco")
    good = FORMATS["refcoco"][0]("im0.jpg", FORMATS["refcoco"][1], "x")
    make_split(tmp_path, "refcoco", "val", [good, bad])
    with pytest.raises(ValueError, match=f"entry 1: {why}"):
        open_split(tmp_path, "refcoco", "val", word_tok)
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        assert len(open_split(tmp_path, "refcoco", "val", word_tok, drop_invalid=True)) == 1


def test_a_split_with_nothing_to_evaluate_is_refused_naming_the_file(tmp_path, word_tok):
    fabricate(tmp_path, "refcoco")
    make_split(tmp_path, "refcoco", "val", [])
    with pytest.raises(ValueError, match=r"no usable entries in .*unc_val.pth \(the split file is empty\)"):
        open_split(tmp_path, "refcoco", "val", word_tok)
    make_split(tmp_path, "refcoco", "val", [("a.jpg", 0, [1, 1, 5, 5], "", [])])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"unc_val.pth \(1 invalid, skipped\)"):
        open_split(tmp_path, "refcoco", "val", word_tok, drop_invalid=True)
