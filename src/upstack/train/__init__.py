"""Training stages, each a function of one config (see docs/training.md):

    from upstack.train.pretrain import PretrainConfig, pretrain
    from upstack.train.sft import SFTConfig, sft
    from upstack.train.dpo import DPOConfig, dpo

What they share is split by concern: config.py (TrainConfig, check_config), layers.py (--train-layers,
freezing), run.py (run and work folders, resume), inputs.py (load, encode, hold out), model.py (load,
optimizer, LM loss), schedule.py (steps, data order, learning rate), loop.py (the loop, held-out loss,
step callbacks), metrics.py (metrics.jsonl), checkpointing.py (resumable checkpoints, the final
model). Importing these modules does not import torch; the stage functions do. (Nothing is
re-exported here: a package attribute `sft` would hide the module `sft`.)
"""
