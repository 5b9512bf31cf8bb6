"""Training stages, each a function of one config (see docs/training.md):

    from upstack.train.pretrain import PretrainConfig, pretrain
    from upstack.train.sft import SFTConfig, sft
    from upstack.train.dpo import DPOConfig, dpo

common.py holds what they share (run folder, model loading, freezing, the loop); chat.py renders
conversations with a response mask. Importing these modules does not import torch; the stage
functions do. (Nothing is re-exported here: a package attribute `sft` would hide the module `sft`.)
"""
