"""A run, start to finish: what ``scripts/train.py`` does, reachable from Python and tests.

``train_run(recipe)`` fine-tunes the recipe's model on its data (with ``QATCallback`` when
``quant.mode=qat``; in float when ``ptq`` or no ``quant``; LoRA adapters on an NF4 base, merged after
training, when the recipe has ``qlora:``), trains the float twin if the recipe asks, evaluates
float / PTQ / QAT perplexity, logs to W&B and calls the export hook. Outputs::

    runs/<name>/config.yaml              the resolved recipe
    runs/<name>/model/                   model config + tokenizer (the architecture, no weights)
    runs/<name>/checkpoints/last.ckpt    the trained model (QAT, or float for ptq/no quant)
    runs/<name>/float/                   the float twin (same layout), when trained
    runs/<name>/eval.json                perplexities and the share of the PTQ gap recovered
    runs/<name>/layer_errors.{json,png}  per-layer quantization error, PTQ vs QAT
    runs/<name>/wandb/                   the W&B run (offline unless wandb.mode=online)
    runs/<name>/exports/                 written by ``export_run``

``load_run(run_dir or .ckpt)`` rebuilds any of these models, quantization included. Checkpoints are
written atomically; ``train_run(recipe, resume=True)`` (``scripts/train.py --resume``) continues an
interrupted run from them exactly: the same loss curve, quantizer state and data order.
"""
from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from ..cli import UserError
from ..export.io import atomic_file
from ..evaluate import EvalReport, bake_weights, perplexity, ptq_model
from ..prepare import (calibrate, check_plan, fake_quant_modules, layer_errors, needs_calibration,
                       nonfinite_parameters, prepare, set_fake_quant_enabled)
from ..recipe import ExportConfig, Recipe, dump_config, load_resolved
from .data import TextDataModule
from .model import build_from_config, context_length, load_model, save_model_config
from .module import CausalLMModule, freeze_except

__all__ = ["train_run", "fit", "load_run", "read_checkpoint", "evaluate_run", "heldout_blocks", "compare",
           "export_run", "run_paths"]

FLOAT_DIR = "float"  # the float twin's run directory, inside the main one


# -- small pieces ---------------------------------------------------------------------------------------

@contextmanager
def _stage(what: str) -> Iterator[None]:
    """Print what is happening and how long it took (gpt-fast style)."""
    print(f"qat: {what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"qat: {what}: {time.perf_counter() - t0:.1f}s", flush=True)


def _precision(recipe: Recipe) -> str:
    if recipe.train.precision != "auto":
        return recipe.train.precision
    on_gpu = torch.cuda.is_available() and recipe.train.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def _device(recipe: Recipe) -> torch.device:
    on_gpu = torch.cuda.is_available() and recipe.train.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if on_gpu else "cpu")


def _autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


def _module(model: nn.Module, recipe: Recipe) -> CausalLMModule:
    t = recipe.train
    return CausalLMModule(model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, warmup_steps=t.warmup_steps,
                          max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _adapt(model: nn.Module, recipe: Recipe) -> nn.Module:
    """A ``qlora:`` recipe trains LoRA adapters on an NF4 base made from ``model`` (in place); others train
    ``model`` itself."""
    if recipe.qlora is None:
        return model
    from ..qlora import QLoRAConfig, load_qlora
    return load_qlora(model, QLoRAConfig(**recipe.qlora.model_dump(),
                                         gradient_checkpointing=recipe.train.gradient_checkpointing))


def _merge(module: CausalLMModule, recipe: Recipe) -> CausalLMModule:
    """After QLoRA training: the adapters merged onto ``dequant_nf4(W)`` (quantizers kept), so evaluation
    and export see a plain model holding exactly what the last training step multiplied by."""
    if recipe.qlora is not None:
        from ..qlora import merge_qlora
        module.model = merge_qlora(module.model)
    return module


def _new_run_dir(run_dir: Path) -> None:
    """Start ``run_dir`` afresh; refuse to delete a directory that is not a run of ours."""
    if run_dir.exists():
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} exists and is not a run directory; pick another name= or output_dir=")
        print(f"qat: replacing the previous run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create the run directory {run_dir}: {e.strerror}; pick another output_dir=") from e


def _check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """``--resume`` continues a run only with the recipe it was started with: anything else would not be
    the run that was interrupted."""
    import yaml
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = yaml.safe_load(dump_config(recipe))

    def flat(d, prefix=""):
        return {k: v for key, value in d.items()
                for k, v in (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) and value
                             else [(f"{prefix}{key}", value)])}
    a, b = flat(saved), flat(now)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        raise UserError(f"--resume: the recipe differs from {run_dir / 'config.yaml'} in {', '.join(changed)}; "
                        "resume with the recipe and overrides the run was started with, or drop --resume to "
                        "start afresh")


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints land whole or not at all: written to a temporary sibling and renamed over the previous
    one, so a kill mid-write leaves the last checkpoint intact (Lightning's writer renames from $TMPDIR,
    which is a copy when that is another filesystem). A full disk is one clear message."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint of ours, read with ``weights_only=True``; a truncated, corrupt or untrusted file is a UserError."""
    import zipfile
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a complete PyTorch checkpoint (truncated or corrupt); re-run the training, "
                        "or --resume it if it saved an intact checkpoint before")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds Python objects other than tensors and plain containers; refusing to load it "
                        f"(unpickling them could run arbitrary code). Load only checkpoints written by "
                        f"scripts/train.py. ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0]}); re-run the training") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a Lightning checkpoint of scripts/train.py (no state_dict)")
    return ckpt


def _logger(recipe: Recipe, out_dir: Path, name: str, job: str):
    """Lightning's WandbLogger (offline unless the recipe says online); a CSV logger when W&B is off."""
    w = recipe.wandb
    if not w.enabled or w.mode == "disabled":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(save_dir=str(out_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger
    os.environ["WANDB_MODE"] = w.mode  # explicit, so an inherited WANDB_MODE cannot send an offline run online
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(name=name, project=w.project, entity=w.entity, save_dir=str(out_dir), group=recipe.name,
                       job_type=job, tags=list(w.tags), config=recipe.model_dump(mode="json"), mode=w.mode)


def _finish(logger) -> None:
    from lightning.pytorch.loggers import WandbLogger
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()


def run_paths(run_dir: Path) -> dict[str, Path]:
    return {"config": run_dir / "config.yaml", "checkpoint": run_dir / "checkpoints" / "last.ckpt",
            "float_checkpoint": run_dir / FLOAT_DIR / "checkpoints" / "last.ckpt", "eval": run_dir / "eval.json",
            "layer_errors": run_dir / "layer_errors.png", "wandb": run_dir / "wandb", "exports": run_dir / "exports"}


# -- training -----------------------------------------------------------------------------------------

def fit(model: nn.Module, recipe: Recipe, datamodule: TextDataModule, out_dir: Path, job: str,
        quantize: bool, resume: bool = False) -> tuple[CausalLMModule, object, list]:
    """Fine-tune ``model`` (in place) as the recipe's ``train:`` says; with QAT when ``quantize``; from
    ``out_dir/checkpoints/last.ckpt`` when ``resume`` and there is one.

    Returns the module, the QATCallback (or None) and the loggers, still open for the eval to log into.
    """
    t, q = recipe.train, recipe.quant
    L.seed_everything(recipe.seed, verbose=False)  # the float twin and the QAT model see the same batches
    module = _module(model, recipe)
    if recipe.qlora is None:
        trained, total = freeze_except(module.model, t.trainable)
        if trained == 0:
            raise UserError(f"train.trainable={t.trainable} matches no parameter; names look like "
                            f"{next(iter(dict(module.model.named_parameters())))!r}")
        if t.gradient_checkpointing:
            module.model.gradient_checkpointing_enable()
    else:  # peft decided: the adapters train, the NF4 base is frozen
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
    print(f"qat: {job}: training {_count(trained)} of {_count(total)} parameters for {t.max_steps} steps", flush=True)
    from lightning.pytorch.callbacks import ModelCheckpoint
    last = out_dir / "checkpoints" / "last.ckpt"
    every = t.checkpoint_every_n_steps or t.max_steps
    callbacks = [ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=every, enable_version_counter=False)]
    qat_cb = None
    if quantize:
        from ..callback import QATCallback
        qat_cb = QATCallback(**q.callback_kwargs())
        callbacks.append(qat_cb)
    logger = _logger(recipe, out_dir, recipe.name if job != "float twin" else f"{recipe.name}-float",
                     "qat" if quantize else "float")
    validate = t.val_every_n_steps is not None
    trainer = L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices, precision=_precision(recipe),
        gradient_clip_val=t.grad_clip, accumulate_grad_batches=t.accumulate_grad_batches, callbacks=callbacks,
        logger=logger, log_every_n_steps=t.log_every_n_steps, default_root_dir=str(out_dir),
        val_check_interval=t.val_every_n_steps if validate else None, check_val_every_n_epoch=None,
        limit_val_batches=(t.val_batches or 1.0) if validate else 0, num_sanity_val_steps=0,
        enable_model_summary=False, plugins=[_AtomicCheckpointIO()],
        use_distributed_sampler=False)  # the data module's EpochShuffle shards itself and resumes mid-epoch
    ckpt_path = None
    if resume and last.is_file():
        step = read_checkpoint(last, mmap=True).get("global_step")  # refuse a corrupt or untrusted file up front
        print(f"qat: {job}: resuming from {last} (step {step} of {t.max_steps})", flush=True)
        ckpt_path = str(last)
    elif resume:
        print(f"qat: {job}: no checkpoint in {last.parent} yet; training from the start", flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`val_check_interval`.*")
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")  # EpochShuffle resumes there
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.global_step % every:  # Lightning's last.ckpt is the last multiple of `every`: keep the final step
        trainer.save_checkpoint(last)
    return module, qat_cb, [logger]


def train_run(recipe: Recipe, resume: bool = False) -> Path:
    """The main job: fine-tune (QAT and its float twin as the recipe says), evaluate, export. Returns the run dir.

    ``resume``: continue the run in ``recipe.run_dir`` from its last checkpoints (the recipe must be the one
    it was started with); without a previous run it starts afresh."""
    t0 = time.perf_counter()
    run_dir = recipe.run_dir
    resuming = resume and (run_dir / "config.yaml").is_file()
    if resuming:
        _check_resumable(run_dir, recipe)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    q = recipe.quant
    qat_mode = q is not None and q.mode == "qat"
    twin = qat_mode and recipe.eval.enabled and recipe.eval.float_twin

    with _stage(f"loading model ({recipe.model.kind}{': ' + recipe.model.path if recipe.model.path else ''})"):
        model, tokenizer = load_model(recipe.model, seed=recipe.seed)
    bad = nonfinite_parameters(model)
    if bad:
        raise UserError(f"the model's weights hold NaN or Inf values ({bad}): the model files are damaged; "
                        "load an intact copy")
    with _stage(f"loading and packing data ({recipe.data.source})"):
        data = TextDataModule(recipe.data, tokenizer, recipe.train.batch_size, recipe.eval.batch_size,
                              seed=recipe.seed, max_context=context_length(model))
        data.setup()
    print(f"qat: {data.summary}", flush=True)
    if q is not None and recipe.qlora is None:  # a layer the scheme cannot take fails now, not after the twin trained
        check_plan(model, q.scheme, q.rules, q.activations, q.skip_incompatible)

    # only now, with model, data and plan known to work, does the previous run make way
    if resuming:
        print(f"qat: resuming the run in {run_dir}", flush=True)
    else:
        if resume:
            print(f"qat: no run to resume in {run_dir}; starting afresh", flush=True)
        _new_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(dump_config(recipe))
    save_model_config(model, tokenizer, run_dir / "model")

    float_module = None
    if twin:
        float_dir = run_dir / FLOAT_DIR
        float_dir.mkdir(exist_ok=resume)
        # the twin's own config: no quant, nothing to export (it is the baseline, not a deliverable)
        twin_config = recipe.model_copy(update={"quant": None, "export": ExportConfig()})
        (float_dir / "config.yaml").write_text(dump_config(twin_config))
        save_model_config(model, tokenizer, float_dir / "model")
        with _stage("training the float twin (the PTQ baseline)"):
            float_module, _, loggers = fit(_adapt(copy.deepcopy(model), recipe), recipe, data, float_dir,
                                           "float twin", quantize=False, resume=resume)
            _merge(float_module, recipe)
        for lg in loggers:
            _finish(lg)

    job = "QAT" if qat_mode else "float fine-tune"
    with _stage(f"training: {job}" + (f" {q.scheme}" if qat_mode else "")):
        module, qat_cb, loggers = fit(_adapt(model, recipe), recipe, data, run_dir, job, quantize=qat_mode,
                                      resume=resume)
        _merge(module, recipe)
    if not qat_mode:
        float_module = module

    if recipe.eval.enabled:
        with _stage("evaluating perplexity on the held-out split"):
            report, errors = compare(float_module.model if float_module else None,
                                     module.model if qat_mode else None, recipe, data)
        report.save(run_dir / "eval.json")
        _log_report(loggers, report, errors, run_dir)
        print("\n" + str(report) + "\n", flush=True)
    for lg in loggers:
        _finish(lg)
    export_run(run_dir, recipe, module, tokenizer)
    _print_outputs(run_dir, time.perf_counter() - t0)
    return run_dir


# -- evaluation -----------------------------------------------------------------------------------------

def compare(float_model: Optional[nn.Module], qat_model: Optional[nn.Module], recipe: Recipe,
            data: TextDataModule) -> tuple[EvalReport, dict[str, list[dict]]]:
    """Perplexity rows for the models there are (float, PTQ of float, QAT) and their per-layer errors."""
    q, device = recipe.quant, _device(recipe)
    autocast = _autocast_dtype(_precision(recipe))
    rows, errors = {}, {}

    def run(name: str, model: nn.Module) -> None:
        baked = bake_weights(model).to(device)
        rows[name] = perplexity(baked, data.val_dataloader(), device, autocast)
        print(f"qat:   {name}: ppl {rows[name]['ppl']:.3f}", flush=True)
        del baked

    if float_model is not None:
        run("float", float_model)
        if q is not None:
            ptq = ptq_model(float_model, **q.prepare_kwargs())
            if needs_calibration(ptq):  # moving-average activation ranges: from training batches, never eval
                calibrate(ptq.to(device), data.train_dataloader())
            errors["ptq"] = layer_errors(ptq)
            run("ptq", ptq)
            del ptq
    if qat_model is not None:
        set_fake_quant_enabled(qat_model, True)
        errors["qat"] = layer_errors(qat_model)
        run("qat", qat_model)
    s = data.summary
    info = {"documents": s.val_documents, "blocks": s.val_blocks, "seq_len": s.seq_len,
            "tokens": next(iter(rows.values()))["tokens"] if rows else 0}
    return EvalReport(q.scheme if q else None, rows, info), errors


def evaluate_run(run_dir: str | os.PathLike, config: Optional[Recipe] = None) -> EvalReport:
    """Evaluate a finished run (and its float twin, if it has one) on ``config.data`` (default: the run's)."""
    run_dir = Path(run_dir)
    module, tokenizer, saved = load_run(run_dir)
    config = config or saved
    q = config.quant
    float_model = qat_model = None
    if q is not None and q.mode == "qat":
        qat_model = module.model
        if run_paths(run_dir)["float_checkpoint"].is_file():
            float_model = load_run(run_dir / FLOAT_DIR)[0].model
    else:
        float_model = unprepared_float(module)
    data = TextDataModule(config.data, tokenizer, config.train.batch_size, config.eval.batch_size, seed=config.seed,
                          max_context=context_length(module.model))
    data.setup()
    report, _ = compare(float_model, qat_model, config, data)
    return report


def heldout_blocks(run_dir: str | os.PathLike, config: Optional[Recipe] = None) -> tuple[object, list[list[int]], dict]:
    """``(tokenizer, blocks, data)``: the held-out token blocks ``evaluate_run`` scores with ``config.data``
    (default: the run's), each evaluated on its own, and the ``data`` summary its report carries. Needs
    only the run's ``model/`` (tokenizer and config), not its checkpoint: what exported files are scored on."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer
    run_dir = Path(run_dir)
    config = config or load_resolved(run_dir / "config.yaml")
    trust = config.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model", trust_remote_code=trust)
    model_config = AutoConfig.from_pretrained(run_dir / "model", trust_remote_code=trust)
    data = TextDataModule(config.data, tokenizer, config.train.batch_size, config.eval.batch_size, seed=config.seed,
                          max_context=context_length(SimpleNamespace(config=model_config)))
    data.setup()
    blocks = [row.tolist() for row in data.val_set["input_ids"]]
    s = data.summary
    return tokenizer, blocks, {"documents": s.val_documents, "blocks": s.val_blocks, "seq_len": s.seq_len,
                               "tokens": sum(len(b) - 1 for b in blocks)}


def unprepared_float(module: CausalLMModule) -> nn.Module:
    """The float model of a run loaded by ``load_run`` (a ptq run comes back prepared)."""
    from ..prepare import unprepare
    return unprepare(copy.deepcopy(module.model)) if any(True for _ in fake_quant_modules(module)) else module.model


def _log_report(loggers: list, report: EvalReport, errors: dict[str, list[dict]], run_dir: Path) -> None:
    """eval metrics to every logger; the per-layer error table (wandb.Table) and plot (PNG) to W&B."""
    metrics = {f"eval/ppl_{k}": v["ppl"] for k, v in report.rows.items()}
    if report.gap_recovered is not None:
        metrics["eval/gap_recovered"] = report.gap_recovered
    table_rows = _error_rows(errors)
    png = None
    if table_rows:
        (run_dir / "layer_errors.json").write_text(json.dumps(table_rows, indent=1) + "\n")
        png = _plot_errors(table_rows, run_dir / "layer_errors.png", report.scheme)
    from lightning.pytorch.loggers import WandbLogger
    for lg in loggers:
        lg.log_metrics(metrics)
        if isinstance(lg, WandbLogger):
            import wandb
            lg.experiment.summary.update(metrics)
            if table_rows:
                cols = list(table_rows[0])
                log = {"qat/layer_errors": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in table_rows])}
                if png is not None:
                    log["qat/layer_errors_plot"] = wandb.Image(str(png))
                lg.experiment.log(log)


def _error_rows(errors: dict[str, list[dict]]) -> list[dict]:
    """One row per layer: its format and relative weight MSE under PTQ and QAT (whichever exist)."""
    by_layer: dict[str, dict] = {}
    for kind, rows in errors.items():
        for r in rows:
            layer = r["layer"].removeprefix("model.model.").removeprefix("model.")
            row = by_layer.setdefault(layer, {"layer": layer, "format": r["format"], "numel": r["numel"]})
            row[f"rel_mse_{kind}"] = r["rel_mse"]
    return list(by_layer.values())


def _plot_errors(rows: list[dict], path: Path, scheme: Optional[str]) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, len(rows) * 0.06), 3.5), dpi=100)
    for kind, style in (("ptq", "o-"), ("qat", "s-")):
        ys = [r.get(f"rel_mse_{kind}") for r in rows]
        if any(y is not None for y in ys):
            ax.plot(range(len(rows)), ys, style, ms=2, lw=0.8, label=kind.upper())
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("relative weight MSE")
    ax.set_title(f"per-layer quantization error ({scheme})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- loading a run back -----------------------------------------------------------------------------------

def load_run(run_dir_or_ckpt: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """``(lightning_module, tokenizer, config)`` of a run directory (its ``checkpoints/last.ckpt``) or a .ckpt.

    The architecture comes from ``<run>/model``, the quantization from ``config.quant``: a QAT run comes
    back with its fake-quant layers and their trained state, a ptq run as the round-to-nearest model of
    its float weights, exactly what was evaluated. The checkpoint is read with ``weights_only=True``.
    """
    p = Path(run_dir_or_ckpt)
    if p.is_file():
        ckpt, run_dir = p, (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    else:
        run_dir, ckpt = p, p / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt}: is {run_dir} a finished run of scripts/train.py?")
    config = load_resolved(run_dir / "config.yaml")
    state = read_checkpoint(ckpt, map_location)["state_dict"]
    model, tokenizer = build_from_config(run_dir / "model", config.model.trust_remote_code)
    q = config.quant
    if config.qlora is not None:
        return _load_qlora_run(_module(_adapt(model, config), config), state, config), tokenizer, config
    module = _module(model, config)
    float_state = {k: v for k, v in state.items() if "_fake_quant." not in k}
    try:
        module.load_state_dict(float_state, strict=q is None or q.mode != "qat")
        if q is not None:
            prepare(module, **q.prepare_kwargs("dynamic" if q.mode == "ptq" else None))
            if q.mode == "qat":
                module.load_state_dict(state)  # the quantizers' trained state (scales, frozen flags)
            set_fake_quant_enabled(module, True)
    except RuntimeError as e:  # missing/unexpected keys, shapes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{ckpt} does not fit the model and quantization in {run_dir} (model/, config.yaml): "
                        f"{lines[min(1, len(lines) - 1)][:300]}; were they edited after training?") from e
    return module.eval(), tokenizer, config


def _load_qlora_run(module: CausalLMModule, state: dict, config: Recipe) -> CausalLMModule:
    """A QLoRA run's checkpoint holds the NF4 base, the adapters and the quantizers: rebuild that structure,
    restore it, merge (as the training flow did before evaluating and exporting)."""
    from ..qlora import load_qlora_state_dict, prepare_qlora
    q = config.quant
    if q is not None and q.mode == "qat":
        prepare_qlora(module, **q.prepare_kwargs())
    load_qlora_state_dict(module, state)
    _merge(module, config)
    if q is not None and q.mode == "ptq":
        prepare(module, **q.prepare_kwargs("dynamic"))
    if q is not None:
        set_fake_quant_enabled(module, True)
    return module.eval()


# -- export hook ----------------------------------------------------------------------------------------

def export_run(run_dir: Path, config: Recipe, module: Optional[CausalLMModule] = None, tokenizer=None) -> list[Path]:
    """Write what the recipe's ``export:`` block asks for into ``run_dir/exports``; returns the files.

    The training flow calls it with the trained module; without one the run is loaded from ``run_dir``.
    A ptq run exports its round-to-nearest model, a QAT run the codes its last training step used.
    """
    if not config.export.configured:
        print("qat: export not configured (the recipe has no export: block)", flush=True)
        return []
    from ..export.run import export_run as write_exports
    if module is None:
        module, tokenizer, _ = load_run(run_dir)
    model = module.model
    q = config.quant
    if q is not None and q.mode == "ptq" and not any(True for _ in fake_quant_modules(model)):
        model = ptq_model(model, **q.prepare_kwargs())
    with _stage(f"exporting to {run_dir / 'exports'}"):
        written = write_exports(model, tokenizer, config.export.model_dump(), run_dir / "exports", force=True,
                                progress=False)
    for path in written:
        print(f"qat:   wrote {path}", flush=True)
    return written


def _print_outputs(run_dir: Path, seconds: float) -> None:
    paths = run_paths(run_dir)
    notes = {"config": "the resolved recipe", "checkpoint": "the trained model: qat.lm.run.load_run(run dir)",
             "float_checkpoint": "the float twin", "eval": "float / PTQ / QAT perplexity",
             "layer_errors": "per-layer quantization error", "wandb": "W&B run (offline: wandb sync <dir>)",
             "exports": "exported models"}
    print(f"qat: done in {seconds:.0f}s; outputs in {run_dir}/", flush=True)
    for key, path in paths.items():
        if path.exists() and (path.is_file() or any(path.iterdir())):
            print(f"  {str(path):<48} {notes[key]}", flush=True)
