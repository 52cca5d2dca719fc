"""A word-level tokenizer saved in the Hugging Face format, so a checkpoint folder loads with
`AutoTokenizer.from_pretrained` (and therefore with diffusers' StableDiffusionPipeline).

Our captions come from a small grammar, so a closed word vocabulary is exact and tiny; CLIP's
BPE vocabulary (49k tokens) would dwarf the rest of the model.
"""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]


def build_word_tokenizer(words, max_length: int) -> PreTrainedTokenizerFast:
    """Tokenizer over `words` (lower-cased, split on whitespace and punctuation), padded and
    truncated to `max_length` ids including <bos> and <eos>."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
    )
