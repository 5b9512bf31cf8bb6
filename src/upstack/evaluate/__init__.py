"""Evaluation: lm-evaluation-harness bridge (H6 and local tasks), perplexity, preference accuracy,
contamination test.

    from upstack.evaluate import EvalConfig, evaluate, perplexity, preference, ContaminationConfig, contamination

Nothing here imports torch, transformers or lm_eval at import time.
"""

from upstack.evaluate.contamination import ContaminationConfig, contamination
from upstack.evaluate.harness import (
           H6,
           EvalConfig,
           compare,
           evaluate,
           h6_score,
           markdown_table,
)
from upstack.evaluate.perplexity import perplexity
from upstack.evaluate.preference import preference

__all__ = ["EvalConfig", "evaluate", "compare", "markdown_table", "h6_score", "H6", "perplexity", "preference",
           "ContaminationConfig", "contamination"]
