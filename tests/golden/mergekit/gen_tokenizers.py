"""Small tokenizers saved without tokenizer.json, for `tokenizer_source` on models that
ship only a GPT-2 BPE (`vocab.json` + `merges.txt`) or a SentencePiece `tokenizer.model`.
Run with a venv holding sentencepiece and transformers (mergekit's brings both):
    venv-mk/bin/python tests/golden/mergekit/gen_tokenizers.py
Writes tokenizers/{gpt2,spm}/ next to it, and tokenizers/expected.json: each one's
vocabulary (token -> id, added tokens included) as transformers' slow tokenizer reads it
(`AutoTokenizer.from_pretrained(dir).get_vocab()`, checked), and the SentencePiece pieces as sentencepiece itself lists them."""
import io, json, os, shutil
import sentencepiece as spm
from tokenizers import ByteLevelBPETokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tokenizers")
TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "merging models keeps the embedding rows of every token",
    "a tokenizer maps text to ids and ids to text again",
    "ünïcödé wörds and émojis 🙂 are pieces too",
] * 8

shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)
expected = {}

# GPT-2 style byte-level BPE: vocab.json + merges.txt, added tokens in
# tokenizer_config.json's added_tokens_decoder and in added_tokens.json.
d = os.path.join(OUT, "gpt2")
os.makedirs(d)
bpe = ByteLevelBPETokenizer()
bpe.train_from_iterator(TEXT, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
bpe.save_model(d)
n = bpe.get_vocab_size()
added = {"<|im_start|>": n, "<|im_end|>": n + 1}
json.dump(added, open(os.path.join(d, "added_tokens.json"), "w"))
decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": True}
           for t, i in [("<|endoftext|>", 0)] + list(added.items())}
json.dump({"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": decoder,
           "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
          open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
vocab = json.load(open(os.path.join(d, "vocab.json")))
try:
    from transformers import AutoTokenizer
    vocab_tf = AutoTokenizer.from_pretrained(d).get_vocab()
except Exception as e:  # a transformers without slow GPT-2: the files' own union
    print("transformers GPT2Tokenizer:", e)
    vocab_tf = None
mine = dict(vocab)
mine.update(added)
if vocab_tf is not None:
    assert vocab_tf == mine, sorted(set(vocab_tf.items()) ^ set(mine.items()))[:10]
expected["gpt2"] = mine

# SentencePiece unigram with byte fallback and user-defined pieces, identity
# normalisation (keeps the file small).
d = os.path.join(OUT, "spm")
os.makedirs(d)
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(TEXT), model_writer=model, vocab_size=120, model_type="unigram",
    normalization_rule_name="identity", byte_fallback=False, user_defined_symbols=["<|im_start|>"],
    control_symbols=["<pad>"], hard_vocab_limit=False, minloglevel=2)
open(os.path.join(d, "tokenizer.model"), "wb").write(model.getvalue())
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
json.dump({"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {
    "0": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False, "special": True}}},
          open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
expected["spm_pieces"] = pieces
expected["spm"] = {p: i for i, p in enumerate(pieces)}
try:
    from transformers import AutoTokenizer
    v = AutoTokenizer.from_pretrained(d).get_vocab()
    assert v == expected["spm"], "LlamaTokenizer disagrees with sentencepiece"
    print("transformers agrees on the SentencePiece vocabulary")
except ImportError as e:
    print("transformers LlamaTokenizer:", e)

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, ensure_ascii=False, indent=0, sort_keys=True)
    f.write("\n")
print({k: len(v) for k, v in expected.items()})
