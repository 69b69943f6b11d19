"""Two-process DDP on CPU (gloo) through Lightning: both ranks end with the same, trained weights.

Lightning's ``strategy="ddp"`` launches the other rank by re-running the command line, so the
training lives in a standalone script written to ``tmp_path`` and run with ``python script.py``.
The model is the real FuseLabelNet (late fusion, random tiny encoders) fed cached features, as in
the frozen regime; each rank's data shard differs, so equal final weights mean the gradients were
all-reduced. Each rank writes its initial and final state dicts; the test compares them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import torch

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from fuselabel.config import Config
    from fuselabel.data import FeatureDataset
    from fuselabel.network import FuseLabelNet
    from fuselabel.module import FuseLabelModule


    class Record(L.Callback):
        def __init__(self):
            self.val_epochs = 0

        def on_validation_epoch_end(self, trainer, module):
            self.val_epochs += 1


    def main(out: Path) -> None:
        torch.set_num_threads(1)
        L.seed_everything(0, verbose=False)
        tiny_text = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
        cfg = Config(kind="late", image_model="tf_efficientnet_lite0", image_pretrained=False, text_pretrained=False,
                     text_config_overrides=tiny_text, hidden_dim=16, dropout=0.1, lr=1e-2, batch_size=8,
                     regime="frozen", late_weight=0.5)
        labels = 4
        net = FuseLabelNet(cfg, labels, pretrained=False)
        rng = np.random.default_rng(0)          # the same rows on every rank; the sampler shards them
        n_train, n_val = 48, 16                 # 48 rows / 2 ranks / batch 8 = 3 steps = one epoch
        feats = {"image": rng.normal(size=(n_train + n_val, net.image_encoder.num_features)).astype(np.float32),
                 "text": rng.normal(size=(n_train + n_val, net.text_encoder.num_features)).astype(np.float32)}
        y = (rng.random((n_train + n_val, labels)) < 0.4).astype(np.float32)
        present = np.ones(n_train + n_val, dtype=np.float32)
        present[::7] = 0                        # some caption-only rows
        split = lambda s: FeatureDataset({k: v[s] for k, v in feats.items()}, y[s], present[s])  # noqa: E731
        train = DataLoader(split(slice(0, n_train)), batch_size=cfg.batch_size, shuffle=True)
        val = DataLoader(split(slice(n_train, None)), batch_size=8)

        module = FuseLabelModule(net, cfg)
        module.set_frozen(True)
        record = Record()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out),
                            callbacks=[record])
        rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.save({k: v.clone() for k, v in net.state_dict().items()}, out / f"init{rank}.pt")
        trainer.fit(module, train, val)
        rank = trainer.global_rank
        torch.save({k: v.clone() for k, v in net.state_dict().items()}, out / f"final{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "val_epochs": record.val_epochs, "val_f1": float(trainer.callback_metrics.get("val_f1", -1)),
            "pid": os.getpid()}))


    if __name__ == "__main__":
        main(Path(sys.argv[1]))
""")


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)  # Lightning picks a free port and sets the ranks itself
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170
    )
    elapsed = time.time() - t0
    assert proc.returncode == 0, f"DDP run failed ({elapsed:.0f}s):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in info] == [0, 1]
    assert all(i["world_size"] == 2 and i["global_step"] == 3 and i["backend"] == "gloo" for i in info)
    assert info[0]["pid"] != info[1]["pid"], "two processes, not one"
    assert all(i["val_epochs"] == 1 for i in info), "validation (with its all_gather) ran on both ranks"
    assert info[0]["val_f1"] == info[1]["val_f1"]

    init = torch.load(tmp_path / "init0.pt", weights_only=True)
    final = [torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in (0, 1)]
    assert final[0].keys() == final[1].keys() == init.keys()
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), f"ranks disagree on {key}"
    head = [k for k in init if k.startswith("head.") and init[k].is_floating_point()]
    changed = [k for k in head if not torch.equal(init[k], final[0][k])]
    assert len(changed) >= len(head) // 2, f"training changed only {changed} of the head"
    frozen = [k for k in init if k.startswith(("image_encoder.", "text_encoder."))]
    assert frozen and all(torch.equal(init[k], final[0][k]) for k in frozen), "frozen encoders must not move"
    print(f"2-process DDP on CPU: {elapsed:.1f}s, {len(changed)}/{len(head)} head tensors trained, ranks equal")


def test_each_rank_builds_its_engine_on_its_own_device():
    """Several ranks: the engine is built when Lightning has assigned the rank's device (cuda:1 on local rank 1),
    not before on a bare ``cuda``; checked with a stand-in model, so no GPU is needed."""
    from types import SimpleNamespace

    from fuselabel import FuseLabel

    built = []

    class Model(FuseLabel):
        def predictor(self, *, strict=False, device=None):
            if self.__dict__.get("_predictor") is None:
                built.append(device)
                self._predictor = SimpleNamespace(engine=SimpleNamespace(device=device))
            return self._predictor

    model = Model()
    model.place_on("cuda:1")
    model.place_on("cuda:1")  # already there: not built again
    assert built == ["cuda:1"]
    model._predictor = SimpleNamespace(engine=SimpleNamespace(device="cuda"))  # built early, before the ranks
    model.place_on("cuda:1")
    assert built == ["cuda:1", "cuda:1"]
