"""mango inside the trainers people use (the roles and the reliability contract): HF `Trainer` with
`optimizers=(mango, scheduler)` and `resume_from_checkpoint`, Lightning's `configure_optimizers`
and `ckpt_path`. Each resumed run must end at exactly the parameters of the uninterrupted one.
Tiny config-built models, CPU, offline, no reporting integrations."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mango  # noqa: E402

STEPS = 6


class _Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences (the task does not matter; determinism does)."""

    def __init__(self, n=24, length=16, vocab=64):
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _hf_run(output_dir, resume_from=None):
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    model = _llama()
    with warnings.catch_warnings(action="error"):  # the model itself: real roles, nothing to warn about
        opt = mango.Mango(model, lr=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=3, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume_from)
    return model, opt


def test_hf_trainer_with_mango_and_scheduler_resumes_exactly(tmp_path):
    straight, opt = _hf_run(tmp_path / "straight")
    assert float(next(iter(opt.state.values()))["step"]) == STEPS
    roles = {n: g["role"] for g in opt.param_groups for n in g["param_names"]}
    assert roles["model.layers.1.self_attn.k_proj.weight"] == "qkv_weight"  # the Trainer steps MANGO's roles
    assert roles["model.embed_tokens.weight"] == "embedding" and roles["lm_head.weight"] == "head"
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    resumed, resumed_opt = _hf_run(tmp_path / "resumed", resume_from=str(checkpoint))
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0  # end of the cosine
    start = _llama().state_dict()
    moved = False
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
        moved |= not torch.equal(a, start[name])
    assert moved


def _lightning_module():
    import lightning as pl

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 32), torch.nn.GELU(),
                                           torch.nn.LayerNorm(32), torch.nn.Linear(32, 64))  # fmt: skip

        def training_step(self, batch, batch_idx):
            x = batch["input_ids"]
            logits = self.net(x[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))

        def configure_optimizers(self):
            with warnings.catch_warnings(action="error"):
                opt = mango.Mango(self, lr=0.01)  # the LightningModule is the model
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=STEPS)  # cycles β1 too
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyLM()


def _lightning_fit(root, ckpt_path=None):
    import lightning as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _lightning_module()
    data = torch.utils.data.DataLoader(_Tokens(n=12), batch_size=4, shuffle=False)  # 3 steps per epoch
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)],
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_configure_optimizers_fit_and_resume_exactly(tmp_path):
    straight, trainer = _lightning_fit(tmp_path / "straight")
    assert trainer.global_step == STEPS
    opt = trainer.optimizers[0]
    assert isinstance(opt, mango.Mango) and float(next(iter(opt.state.values()))["step"]) == STEPS
    roles = {n: g["role"] for g in opt.param_groups for n in g["param_names"]}
    assert roles == {"net.0.weight": "embedding", "net.1.weight": "matrix", "net.1.bias": "vector_bias",
                     "net.3.weight": "vector_weight", "net.3.bias": "vector_bias", "net.4.weight": "matrix",
                     "net.4.bias": "vector_bias"}  # fmt: skip
    (first_epoch,) = (tmp_path / "straight").glob("epoch=0-step=3.ckpt")
    resumed, resumed_trainer = _lightning_fit(tmp_path / "resumed", ckpt_path=str(first_epoch))
    assert resumed_trainer.global_step == STEPS
    for g, h in zip(opt.param_groups, resumed_trainer.optimizers[0].param_groups):
        assert (g["lr"], tuple(g["betas"])) == (h["lr"], tuple(h["betas"]))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.net[1].weight, _lightning_module().net[1].weight)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
