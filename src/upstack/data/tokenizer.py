"""Train the demo's tokenizer: a byte-level BPE with digits split one per token and a chat template.

Special tokens are <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3, matching the tiny test models. No
token is added automatically on encode (like the test tokenizer): the chat template writes <s> and
</s> itself, and training stages add eos between packed documents. Digits are split individually
(LLaMA's choice) so that a tiny model can learn column arithmetic. The chat template marks assistant
turns with `{% generation %}` so `apply_chat_template(..., return_assistant_tokens_mask=True)` gives
the loss mask for SFT.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from upstack.errors import ConfigError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# Rendered: "<s>user\n{content}</s>\n<s>assistant\n{content}</s>\n"; the assistant content and its </s>
# are the generation (loss) span. Strings use {{ '...' }} so Jinja's trim_blocks keeps every newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<s>assistant\\n' }}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def train_tokenizer(text_iter: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, *,
                    min_frequency: int = 2, model_max_length: int = 2048):
    """Train a byte-level BPE on `text_iter`, save it to `out_dir` (save_pretrained), return it.

    Deterministic: the same texts in the same order give the same tokenizer.json bytes. The folder
    loads offline with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ConfigError(f"vocab_size: {vocab_size} is too small for a byte-level BPE (need >= {floor}: "
                          f"256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text_iter, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
