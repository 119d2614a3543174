"""A tiny run for the causal-LM task tests: a corpus of distinct documents and a recipe that trains a
2-layer random Llama on it in seconds."""
from __future__ import annotations

import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = ("crown sword ghost storm witch island father daughter night king queen poison letter dagger sleep "
         "blood ship spirit marriage love death madness honour revenge").split()


def write_corpus(root: Path, n_docs: int = 6, lines: int = 60) -> Path:
    """``doc0.txt`` .. ``doc{n-1}.txt``; every document also carries its own marker word ``docN``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        rng = random.Random(i)
        text = "\n".join(" ".join([f"doc{i}"] + rng.choices(WORDS, k=10)) for _ in range(lines))
        (root / f"doc{i}.txt").write_text(text + "\n")
    return root


def tiny_recipe(tmp: Path, name: str = "tiny", **sections) -> Path:
    """Write a tiny QAT recipe (float twin, 2 steps, W&B offline) under ``tmp``; ``sections`` update it."""
    corpus = write_corpus(tmp / "corpus")
    recipe = {
        "name": name,
        "output_dir": str(tmp / "runs"),
        "model": "tiny",
        "data": {"source": "files", "paths": [str(corpus / "*.txt")], "val_documents": ["doc5"], "seq_len": 32,
                 "val_max_blocks": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every_n_steps": 1, "num_threads": 2},
        "quant": {"scheme": "q4_0", "log_every_n_steps": 1},
        "eval": {"batch_size": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
