"""Run by tests/test_ddp.py as a script: QAT under Lightning DDP, 2 CPU processes (gloo).

    python tests/ddp_worker.py OUT EPOCHS [CKPT]

Each rank writes its final state dict (weights, learned scales, observer buffers) to OUT/rank{r}.pt;
with CKPT it resumes from that checkpoint instead of starting fresh.
"""
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama  # noqa: E402

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from qat import QATCallback  # noqa: E402


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, _):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main():
    out, max_epochs = Path(sys.argv[1]), int(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    L.seed_everything(0)
    data = torch.utils.data.DataLoader(torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0)),
                                       batch_size=4)
    module = LM()
    # learned scales (unused before start_step: DDP must be told, the callback does it) and zero-points
    cbs = [QATCallback("int4_asym_g32", rules={"*.mlp.*": "q4_0"}, observer="learned", start_step=1, freeze_step=3),
           ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)]
    # max_epochs, not max_steps: Lightning 2.6 resumes an end-of-epoch checkpoint exactly only then
    # (with max_steps even a plain float run ends with different weights)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=max_epochs, callbacks=cbs,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(module, data, ckpt_path=ckpt)
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
