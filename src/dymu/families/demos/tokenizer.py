"""The byte-level BPE tokenizer every demo model trains offline on a few sentences (families/demos/)."""

from __future__ import annotations


def train_byte_bpe(corpus: list[str], specials: list[str], vocab_size: int, unk_token: str):
    """A byte-level BPE `tokenizers.Tokenizer` trained offline on ``corpus`` (every demo model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def demo_tokenizer(corpus: list[str], specials: list[str], vocab_size: int, *, unk_token: str, **special_tokens):
    """The transformers fast tokenizer of a demo model: `train_byte_bpe` on ``corpus``, left padding (as
    batched generation wants), and the family's special tokens (bos / eos / pad, ``extra_special_tokens``,
    a chat template)."""
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_bpe(corpus, specials, vocab_size=vocab_size, unk_token=unk_token)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk_token, padding_side="left", **special_tokens)
