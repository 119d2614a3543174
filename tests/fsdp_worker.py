"""Run by tests/test_fsdp.py as a script: QAT under Lightning FSDP, 2 processes (gloo on CPU, NCCL on GPUs).

    python tests/fsdp_worker.py OUT EPOCHS ACCELERATOR [CKPT]

Rank 0 writes the full (gathered) state dict to OUT/rank0.pt and the effective (fake-quantized) weights
of a fresh model loaded from it to OUT/effective.pt (what export reads); every rank writes its buffers
(observer state, frozen flags) to OUT/buffers{r}.pt.
"""
import os
import sys
from datetime import timedelta
from pathlib import Path

# deterministic=True on CUDA needs cuBLAS told before its first call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import LM as DDPLM  # noqa: E402

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

import qat  # noqa: E402
from qat import QATCallback  # noqa: E402

SCHEME, RULES = "int4_asym_g32", {"*.mlp.*": "q4_0"}


class LM(DDPLM):
    def configure_optimizers(self):  # FSDP: the wrapped (sharded) parameters
        return torch.optim.AdamW(self.trainer.model.parameters(), lr=3e-3)


def main():
    out, max_epochs, accel = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    L.seed_everything(0)
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0)),
                                       batch_size=4)
    module = LM()
    cbs = [QATCallback(SCHEME, rules=RULES, observer="learned", start_step=1, freeze_step=3),
           ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)]
    # Lightning's FSDP needs CUDA; on CPU the same script runs under DDP (a dry run of everything else)
    # a short collective timeout: an error on one rank must fail the run, not leave the other waiting 10 min
    strategy = (FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True, state_dict_type="full",
                             timeout=timedelta(seconds=90))
                if accel != "cpu" else "ddp")
    trainer = L.Trainer(accelerator=accel, devices=2, strategy=strategy, max_epochs=max_epochs, callbacks=cbs,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(module, data, ckpt_path=ckpt)
    full = trainer.strategy.lightning_module_state_dict()  # gathered from the shards (full on rank 0)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone().cpu() for k, v in full.items()}, out / "rank0.pt")
        # export from the sharded run: a fresh, prepared model takes the gathered state
        fresh = LM()
        qat.prepare(fresh.model, SCHEME, rules=RULES, observer="learned")
        fresh.load_state_dict(full)
        torch.save({k: v.detach().clone() for k, v in qat.effective_state_dict(fresh.model).items()}, out / "effective.pt")
        codes = qat.convert(fresh.model)  # what the exporters write
        torch.save({k: qat.formats.get_format(q.format).dequantize(q).reshape(q.shape) for k, q in codes.items()},
                   out / "exported.pt")
    # every rank: its replicated buffers (observer state, frozen flags), to compare across ranks
    bufs = {k: v.detach().clone().cpu() for k, v in module.named_buffers()}
    torch.save(bufs, out / f"buffers{trainer.global_rank}.pt")
    trainer.strategy.barrier()


if __name__ == "__main__":
    main()
