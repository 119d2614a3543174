"""Recipes: the YAML a user runs, validated completely before anything heavy starts.

A recipe has the sections ``model``, ``data``, ``train``, ``quant``, ``eval``, ``wandb``, ``export``, and
optionally ``qlora`` (LoRA on a bitsandbytes NF4 base, see ``qat.qlora``).
``model``, ``data`` and ``quant`` may name a preset from ``configs/{models,data,schemes}/`` instead of
spelling it out (``model: smollm2``), or start from one and change a few keys::

    data: {preset: shakespeare, seq_len: 128}

``key.sub=value`` overrides on the command line go through the same schema (``train.max_steps=200``,
``quant.rules.lm_head=q8_0``, ``model=tiny``); values are YAML (``null``, ``[q4_0, f16]``).

Every problem is collected and reported at once, each naming the file and line (or the override) and
the key path, with a did-you-mean for misspelt keys, names and presets. ``RecipeError`` is a
``qat.cli.UserError``: the scripts turn it into one message and exit code 2.
"""
from __future__ import annotations

import difflib
import glob
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cli import UserError

__all__ = ["Recipe", "ModelConfig", "TinyModelConfig", "DataConfig", "TrainConfig", "QuantConfig", "QLoRAConfig",
           "EvalConfig",
           "WandbConfig", "ExportConfig", "RecipeError", "Problem", "load_recipe", "load_resolved", "dump_config",
           "parse_overrides", "CONFIGS_DIR", "PRESET_DIRS", "did_you_mean"]

CONFIGS_DIR = Path(os.environ.get("QAT_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))
PRESET_DIRS = {"model": "models", "data": "data", "quant": "schemes"}  # section -> configs/ subfolder


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice (or the equally close ones), or ``""``."""
    word, choices = str(word), sorted({str(c) for c in choices})
    look_alike = str.maketrans("oli", "011")  # q4_o -> q4_0 before q4_k
    score = {c: (difflib.SequenceMatcher(None, word, c).ratio(),
                 difflib.SequenceMatcher(None, word.translate(look_alike), c.translate(look_alike)).ratio())
             for c in choices}
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    close = [c for c in close if score[c] == max(score[c] for c in close)]
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


# -- value checks that need qat's registries ----------------------------------------------------------

def _scheme_names() -> list[str]:
    from .formats import known_formats
    from .mixes import MIXES
    from .plan import SCHEME_ALIASES
    return sorted({n for n in known_formats() if "<" not in n} | set(SCHEME_ALIASES) | set(MIXES))


def _check_scheme(name: str, allow_mix: bool = True) -> str:
    from .formats import QuantError
    from .mixes import MIXES
    from .plan import resolve_scheme
    if allow_mix and name.lower() in MIXES:
        return name
    try:
        resolve_scheme(name)
    except QuantError:
        raise ValueError(f"unknown scheme {name!r}{did_you_mean(name.lower(), _scheme_names())}; known: "
                         f"{', '.join(_scheme_names())}, int<2-8>[_asym]_<tensor|channel|token|g<N>>") from None
    return name


def _check_layer_scheme(name: str) -> str:
    return _check_scheme(name, allow_mix=False)


def _check_format(name: str) -> str:
    from .formats import QuantError, get_format
    try:
        get_format(name)
    except QuantError as e:
        raise ValueError(str(e)) from None
    return name


FLOAT_TYPES = ("f32", "f16", "bf16")


def _gguf_types() -> list[str]:
    from .formats import known_formats
    from .mixes import MIXES
    return sorted({n for n in known_formats() if n.startswith("q") and "<" not in n} | set(MIXES) | set(FLOAT_TYPES))


def _is_gguf_type(name: str) -> bool:
    return name.lower() in _gguf_types()


def _check_gguf_type(name: str) -> str:
    known = _gguf_types()
    if name.lower() not in known:
        raise ValueError(f"unknown GGUF type {name!r}{did_you_mean(name.lower(), known)}; known: {', '.join(known)}")
    return name.lower()


def _check_paths(patterns: list[str]) -> list[str]:
    missing = [p for p in patterns if not glob.glob(os.path.expanduser(p))]
    if missing:
        raise ValueError(f"no file matches {', '.join(map(repr, missing))} (relative to {os.getcwd()})")
    return patterns


Scheme = Annotated[str, AfterValidator(_check_scheme)]
LayerScheme = Annotated[str, AfterValidator(_check_layer_scheme)]
FormatName = Annotated[str, AfterValidator(_check_format)]
GGUFType = Annotated[str, AfterValidator(_check_gguf_type)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# -- the sections -------------------------------------------------------------------------------------

class TinyModelConfig(_Section):
    """A randomly initialised Llama with the embedded SmolLM2 tokenizer: tests and smoke runs, no download."""
    hidden_size: PosInt = 64
    intermediate_size: PosInt = 128
    num_hidden_layers: PosInt = 2
    num_attention_heads: PosInt = 4
    num_key_value_heads: PosInt = 2
    max_position_embeddings: PosInt = 256
    tie_word_embeddings: bool = True


class ModelConfig(_Section):
    kind: Literal["embedded", "hf", "gguf", "tiny"] = "embedded"
    path: Optional[str] = None          # hf: a model directory or hub id; gguf: a .gguf file (or a dir, with gguf_file)
    gguf_file: Optional[str] = None     # gguf: file name inside `path` when `path` is a directory or hub repo
    revision: Optional[str] = None      # hub revision (hf, gguf)
    trust_remote_code: bool = False     # run the model repository's own Python code: only for repos you trust
    tiny: TinyModelConfig = TinyModelConfig()

    @model_validator(mode="after")
    def _path_fits_kind(self) -> "ModelConfig":
        if self.kind in ("hf", "gguf") and not self.path:
            raise ValueError(f"model.kind={self.kind} needs model.path")
        if self.kind == "gguf" and self.path and _looks_local(self.path):
            p = Path(self.path).expanduser()
            target = p / self.gguf_file if (p.is_dir() and self.gguf_file) else p
            if not target.is_file():
                raise ValueError(f"GGUF file {str(target)!r} not found")
        if self.kind == "hf" and self.path and _looks_local(self.path) and not Path(self.path).expanduser().is_dir():
            raise ValueError(f"model directory {self.path!r} not found")
        return self


def _looks_local(path: str) -> bool:
    """A path rather than a hub id (``org/name``)."""
    return path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") != 1 or Path(path).exists()


class DataConfig(_Section):
    source: Literal["shakespeare", "files", "hub"] = "shakespeare"
    paths: Annotated[list[str], AfterValidator(_check_paths)] = []  # files: .txt/.md (a document each), .jsonl/.json/.parquet (a row each); globs ok
    hub_name: Optional[str] = None      # hub: a dataset name for datasets.load_dataset
    hub_config: Optional[str] = None
    hub_split: str = "train"
    text_field: str = "text"            # jsonl / parquet / hub: the column holding the text
    document_field: Optional[str] = None  # rows sharing this column's value form one document
    val_documents: list[str] = []       # held-out documents (names or fnmatch patterns); empty: val_fraction
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    seq_len: Annotated[int, Field(ge=2)] = 256
    val_max_blocks: Optional[PosInt] = None  # evaluate on this many blocks, spread evenly over the held-out text
    num_workers: NonNegInt = 0

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("data.source=files needs data.paths")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.source=hub needs data.hub_name")
        return self


class TrainConfig(_Section):
    max_steps: PosInt = 100
    batch_size: PosInt = 8
    accumulate_grad_batches: PosInt = 1
    lr: Annotated[float, Field(gt=0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: Optional[Annotated[float, Field(gt=0)]] = 1.0
    trainable: list[str] = ["*"]        # fnmatch patterns on parameter names; the rest is frozen
    gradient_checkpointing: bool = False
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: PosInt = 1
    val_every_n_steps: Optional[PosInt] = None  # None: no validation during training (the final eval runs anyway)
    val_batches: Optional[PosInt] = None        # batches per in-training validation
    log_every_n_steps: PosInt = 10
    num_threads: Optional[PosInt] = None        # torch CPU threads (None: torch's default)
    checkpoint_every_n_steps: Optional[PosInt] = None  # also save checkpoints/last.ckpt every N steps, for --resume


class QuantConfig(_Section):
    """``qat.QATCallback``'s arguments, plus ``mode``: ``qat`` trains with fake quant; ``ptq`` trains in
    float and rounds to nearest afterwards (the baseline QAT has to beat)."""
    mode: Literal["qat", "ptq"] = "qat"
    scheme: Scheme
    rules: dict[str, Optional[LayerScheme]] = {}
    start_step: NonNegInt = 0
    freeze_step: Optional[NonNegInt] = None
    observer: Literal["dynamic", "mse", "learned"] = "dynamic"
    activations: Optional[FormatName] = None
    act_observer: Literal["dynamic", "moving_average"] = "dynamic"
    skip_incompatible: bool = False
    log_every_n_steps: NonNegInt = 50
    step_cache: Optional[bool] = None  # fake quant once per optimizer step (qat/step_cache.py); None: the callback's default

    def callback_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``qat.QATCallback`` (and, but for the schedule, of ``qat.prepare``)."""
        return self.model_dump(exclude={"mode"})

    def prepare_kwargs(self, observer: Optional[str] = None) -> dict[str, Any]:
        return dict(scheme=self.scheme, rules=self.rules, observer=observer or self.observer,
                    activations=self.activations, act_observer=self.act_observer,
                    skip_incompatible=self.skip_incompatible)


class QLoRAConfig(_Section):
    """QLoRA (``qat.qlora``): LoRA adapters on a frozen bitsandbytes NF4 base; only the adapters train
    (``train.trainable`` does not apply; ``train.gradient_checkpointing`` does, non-reentrant). With a
    ``quant:`` block each adapted layer trains through ``fake_quant(dequant_nf4(W) + alpha/r * B @ A)``
    and the merge onto ``dequant_nf4(W)`` exports exactly those codes. Fields as ``qat.qlora.QLoRAConfig``."""
    r: PosInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Optional[list[str]] = None  # peft's target_modules; None: every Linear but the output head
    double_quant: bool = True                   # bitsandbytes' compress_statistics
    compute_dtype: Optional[Literal["bfloat16", "float16", "float32"]] = None  # None: bf16 on GPU, fp32 on CPU


class EvalConfig(_Section):
    enabled: bool = True
    float_twin: bool = True     # quant.mode=qat: also train the same fine-tune without QAT, for the float and PTQ rows
    batch_size: PosInt = 8


class WandbConfig(_Section):
    enabled: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "qat"
    entity: Optional[str] = None
    tags: list[str] = []


class ExportConfig(_Section):
    """What the run exports into ``runs/<name>/exports/`` (done by ``qat.lm.run.export_run``)."""
    gguf: list[GGUFType] = []          # GGUF types to write, e.g. [q4_0, f16]
    compressed_tensors: bool = False
    torchao: bool = False
    float_type: Literal["f16", "bf16", "f32"] = "f16"  # type of the tensors left in float

    @property
    def configured(self) -> bool:
        return bool(self.gguf or self.compressed_tensors or self.torchao)


class Recipe(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    qlora: Optional[QLoRAConfig] = None
    quant: Optional[QuantConfig] = None
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()
    export: ExportConfig = ExportConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _cross_section_problems(r: Recipe) -> list[tuple[tuple, str]]:
    """Checks that involve two sections: ``(key path, message)`` each."""
    out = []
    q, t = r.quant, r.train
    if q is not None and q.mode == "qat" and q.start_step >= t.max_steps:
        out.append((("quant", "start_step"), f"{q.start_step} is not below train.max_steps={t.max_steps}: "
                                              "fake quant would never switch on"))
    if q is not None and q.freeze_step is not None and q.freeze_step < q.start_step:
        out.append((("quant", "freeze_step"), f"{q.freeze_step} comes before quant.start_step={q.start_step}"))
    if r.qlora is not None and list(t.trainable) != ["*"]:
        out.append((("train", "trainable"), "qlora: trains the LoRA adapters only; leave train.trainable out"))
    for i, t in enumerate(r.export.gguf):
        if t in FLOAT_TYPES:
            continue
        if q is None:
            out.append((("export", "gguf", str(i)), f"{t}: a float run exports only {', '.join(FLOAT_TYPES)}; "
                                                    "add a quant: block to train or round it to a format"))
        elif t != q.scheme.lower():
            ok = q.scheme.lower() if _is_gguf_type(q.scheme) else None
            out.append((("export", "gguf", str(i)), f"{t} would re-quantize a model trained as {q.scheme}; "
                        + (f"export it as {ok} (or f16/bf16/f32)" if ok else
                           f"{q.scheme} is not a GGUF type (export.torchao or export.compressed_tensors take it)")))
    if r.model.kind == "tiny" and r.data.seq_len > r.model.tiny.max_position_embeddings:
        out.append((("data", "seq_len"), f"{r.data.seq_len} is beyond the model's context "
                                         f"(model.tiny.max_position_embeddings={r.model.tiny.max_position_embeddings})"))
    return out


# -- problems -----------------------------------------------------------------------------------------

@dataclass
class Problem:
    where: str    # "recipes/x.yaml:12", "override 'train.lr=fast'", "configs/models/y.yaml:3"
    key: str      # dotted key path, "" for the whole recipe
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key + ': ' if self.key else ''}{self.message}"


class RecipeError(UserError):
    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source, self.problems = source, list(problems)
        n = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")


def _reading_order(recipe_file: str, overrides: Sequence[str]):
    """The recipe's problems by line, then the presets', then the overrides' in command-line order."""
    position = {f"override {o!r}": i for i, o in enumerate(overrides)}

    def order(p: Problem) -> tuple:
        if p.where in position:
            return (2, "", position[p.where])
        file, _, line = p.where.rpartition(":")
        return (0 if file == recipe_file else 1, file, int(line) if line.isdigit() else 0)
    return order


def _key(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc)


class _Origins:
    """Where each key path came from; an error is reported at the most specific one known."""

    def __init__(self):
        # overrides, recipe, presets, sections an override created: first wins at equal depth
        self.layers: list[dict[tuple, str]] = [{}, {}, {}, {}]

    def add_override(self, parts: Sequence[str], text: str) -> None:
        self.layers[0][tuple(parts)] = f"override {text!r}"
        for layer in self.layers[1:3]:  # what the override replaced is no longer where its keys come from
            for key in [k for k in layer if k[:len(parts)] == tuple(parts) and len(k) > len(parts)]:
                del layer[key]
        for n in range(1, len(parts)):
            self.layers[3].setdefault(tuple(parts[:n]), f"override {text!r}")

    def add(self, layer: int, lines: dict[tuple, int], file: str, prefix: tuple = ()) -> None:
        for path, line in lines.items():
            self.layers[layer][prefix + path] = f"{file}:{line}"

    def where(self, loc: Sequence, default: str) -> str:
        loc = tuple(str(p) for p in loc)
        for n in range(len(loc), 0, -1):
            for layer in self.layers:
                if loc[:n] in layer:
                    return layer[loc[:n]]
        return default


# -- YAML with line numbers ---------------------------------------------------------------------------

def _load_yaml(path: Path, problems: list[Problem]) -> tuple[Any, dict[tuple, int]]:
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problems.append(Problem(where, "", f"not valid YAML: {getattr(e, 'problem', None) or e}"))
        return None, {}
    lines: dict[tuple, int] = {}

    def walk(n, at: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                key = str(k.value)
                if key in seen:
                    problems.append(Problem(f"{path}:{k.start_mark.line + 1}", _key(at + (key,)), "duplicate key"))
                seen.add(key)
                lines[at + (key,)] = k.start_mark.line + 1
                walk(v, at + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[at + (str(i),)] = v.start_mark.line + 1
                walk(v, at + (str(i),))

    if node is not None:
        walk(node, ())
    return data, lines


# -- the schema, walked by key path ---------------------------------------------------------------------

def _unwrap(annotation) -> Any:
    """``Optional[X]`` / ``Annotated[X, ...]`` -> ``X``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _field(cls: Optional[type], key: str) -> tuple[str, Optional[type]]:
    """What ``key`` is in section ``cls``: ("section", cls) | ("dict", None) | ("value", None) | ("unknown", None)."""
    if cls is None or key not in cls.model_fields:
        return "unknown", None
    ann = _unwrap(cls.model_fields[key].annotation)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section", ann
    if typing.get_origin(ann) is dict:
        return "dict", None
    return "value", None


def _section_at(loc: Sequence) -> Optional[type]:
    cls: Optional[type] = Recipe
    for part in loc:
        kind, cls = _field(cls, str(part))
        if kind != "section":
            return None
    return cls


def _merge(base: dict, top: dict, cls: Optional[type]) -> dict:
    """``top`` over ``base``; sub-sections merge key by key, everything else (rules, lists) is replaced."""
    out = dict(base)
    for k, v in top.items():
        kind, sub = _field(cls, k)
        if kind == "section" and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, sub)
        else:
            out[k] = v
    return out


# -- overrides ----------------------------------------------------------------------------------------

def parse_overrides(items: Sequence[str]) -> tuple[list[tuple[str, list[str], Any]], list[Problem]]:
    """``["train.lr=3e-4", ...]`` -> ``[(text, key path, value)]``; values parsed as YAML."""
    out, problems = [], []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key or any(not p for p in key.split(".")):
            problems.append(Problem(f"override {item!r}", "", "expected key.sub=value (e.g. train.max_steps=200)"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out.append((item, key.split("."), value))
    return out, problems


def _apply_override(raw: dict, parts: list[str], value: Any) -> Optional[str]:
    """Set ``parts`` in ``raw`` to ``value``; a message if the path goes through a value."""
    node, cls = raw, Recipe
    for i, part in enumerate(parts[:-1]):
        kind, sub = _field(cls, part)
        if kind == "dict":  # the rest of the path is one key of a mapping (rule patterns hold dots)
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][".".join(parts[i + 1:])] = value
            return None
        if kind == "value":
            return f"{_key(parts[:i + 1])} is a value, not a section"
        child = node.get(part)
        if isinstance(child, str) and i == 0 and part in PRESET_DIRS:
            child = {"preset": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            return f"{_key(parts[:i + 1])} is a value, not a section"
        node[part] = child
        node, cls = child, sub
    node[parts[-1]] = value
    return None


# -- presets ------------------------------------------------------------------------------------------

def _preset_file(section: str, name: str, recipe_dir: Path) -> tuple[Optional[Path], str]:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        for p in (Path(name).expanduser(), recipe_dir / name):
            if p.is_file():
                return p, ""
        return None, f"preset file {name!r} not found"
    folder = CONFIGS_DIR / PRESET_DIRS[section]
    p = folder / f"{name}.yaml"
    if p.is_file():
        return p, ""
    known = sorted(f.stem for f in folder.glob("*.yaml"))
    return None, (f"no {section} preset {name!r}{did_you_mean(name, known)}; "
                  f"presets in {folder}: {', '.join(known) or 'none'}")


def _resolve_presets(raw: dict, origins: _Origins, recipe_dir: Path, problems: list[Problem], default: str) -> None:
    for section in PRESET_DIRS:
        value = raw.get(section)
        if isinstance(value, str):
            value = {"preset": value}
        if not isinstance(value, dict) or "preset" not in value:
            continue
        name = value.pop("preset")
        if not isinstance(name, str):
            problems.append(Problem(origins.where((section, "preset"), default), f"{section}.preset",
                                    f"expected a preset name, got {name!r}"))
            continue
        path, why = _preset_file(section, name, recipe_dir)
        if path is None:
            problems.append(Problem(origins.where((section, "preset"), default), f"{section}.preset", why))
            raw[section] = value  # still check the section's other keys
            continue
        data, lines = _load_yaml(path, problems)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(Problem(str(path), "", f"a {section} preset must be a mapping of keys"))
            continue
        origins.add(2, lines, _display(path), prefix=(section,))
        raw[section] = _merge(data, value, _section_at((section,)))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- validation -----------------------------------------------------------------------------------------

def _problem_from_error(err: dict, origins: _Origins, default: str) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "literal["))))
    key, kind, msg = _key(loc), err["type"], err["msg"]
    where = origins.where(loc, default)
    if kind == "extra_forbidden":
        cls = _section_at(loc[:-1])
        fields = list(cls.model_fields) if cls else []
        hint = did_you_mean(loc[-1], fields)
        section = _key(loc[:-1]) or "a recipe"
        msg = f"unknown key{hint}; {section} takes: {', '.join(fields)}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "literal_error":
        choices = [c.strip(" '") for c in err.get("ctx", {}).get("expected", "").replace(" or ", ",").split(",")]
        msg = f"{err['input']!r} is not one of {', '.join(c for c in choices if c)}{did_you_mean(err['input'], choices)}"
    elif kind in ("value_error", "assertion_error"):
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg}, got {err['input']!r}"
    return Problem(where, key, msg)


def _validate(raw: dict, origins: _Origins, default: str, problems: list[Problem]) -> Optional[Recipe]:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems.extend(_problem_from_error(err, origins, default) for err in e.errors(include_url=False))
        return None
    for loc, msg in _cross_section_problems(recipe):
        problems.append(Problem(origins.where(loc, default), _key(loc), msg))
    return None if problems else recipe


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, resolve (presets, overrides) and validate a recipe; ``RecipeError`` lists every problem."""
    path = Path(path)
    if not path.is_file():
        siblings = [str(p) for p in path.parent.glob("*.yaml")] if path.parent.is_dir() else []
        raise UserError(f"recipe {str(path)!r} not found{did_you_mean(str(path), siblings)}")
    shown = _display(path)
    problems: list[Problem] = []
    raw, lines = _load_yaml(path, problems)
    if problems:
        raise RecipeError(shown, problems)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(shown, [Problem(shown, "", "a recipe must be a mapping of sections (model:, data:, ...)")])
    origins = _Origins()
    origins.add(1, lines, shown)
    parsed, problems = parse_overrides(overrides)
    for text, parts, value in parsed:
        origins.add_override(parts, text)
        why = _apply_override(raw, parts, value)
        if why:
            problems.append(Problem(f"override {text!r}", _key(parts), why))
    _resolve_presets(raw, origins, path.parent, problems, shown)
    raw.setdefault("name", path.stem)
    recipe = _validate(raw, origins, shown, problems)
    if recipe is None:
        raise RecipeError(shown, sorted(problems, key=_reading_order(shown, overrides)))
    return recipe


def dump_config(recipe: Recipe) -> str:
    """The resolved recipe as YAML: what ``--print-config`` prints and ``runs/<name>/config.yaml`` holds."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)


def load_resolved(path: str | os.PathLike) -> Recipe:
    """A run's saved ``config.yaml`` back into a ``Recipe`` (validated the same way)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{str(path)!r} not found: is this a run directory written by scripts/train.py?")
    return load_recipe(path)
