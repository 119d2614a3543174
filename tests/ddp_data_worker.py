"""Run by tests/test_reliability.py as a script: QAT under Lightning DDP (2 CPU processes, gloo) fed by the
recipe runner's data module, whose EpochShuffle shards itself (``use_distributed_sampler=False``, as
``qat.lm.run`` sets it) so that a run resumed inside an epoch continues where it stopped.

    python tests/ddp_data_worker.py OUT STOP [CKPT]

STOP > 0 stops after that many optimizer steps (a checkpoint every step); CKPT resumes from a checkpoint.
Each rank writes OUT/rank{r}.pt: its final state dict and the (step, first token of each sample) it trained on.
"""
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama  # noqa: E402

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from qat import QATCallback  # noqa: E402
from qat.lm.data import TextDataModule  # noqa: E402
from qat.recipe import DataConfig  # noqa: E402

MAX_STEPS = 8


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, _):
        ids = batch["input_ids"]
        self.seen.append((self.global_step, ids[:, 0].tolist()))
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Stop(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *_):
        if self.at:
            trainer.should_stop = trainer.global_step >= self.at


def main():
    out, stop = Path(sys.argv[1]), int(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TextDataModule(DataConfig(seq_len=16), tokenizer=None, batch_size=2, seed=5)
    # 9 samples, the first token of sample i is i (the record of who saw what); 5 a rank, padded
    data.train_set = [{"input_ids": torch.cat([torch.tensor([i]), torch.randint(0, 256, (15,), generator=g)])}
                      for i in range(9)]
    module = LM()
    cbs = [QATCallback("q4_0"), Stop(stop),
           ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, enable_version_counter=False)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=MAX_STEPS, max_epochs=-1,
                        use_distributed_sampler=False, callbacks=cbs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, limit_val_batches=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    torch.save({"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "seen": module.seen},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
