"""The text tower without torch: a class added by name gets its zero-shot head row at once.

The base export (base.py) also writes the backbone's text encoder as ``text.onnx`` (tokens [N, L] int64 ->
raw text features [N, D]) and the CLIP BPE vocabulary, so an API process (numpy + ONNX Runtime, no torch)
can embed a new class name in milliseconds. ``BpeTokenizer`` reproduces open_clip's SimpleTokenizer (lower
case, byte-level BPE, <start_of_text> ... <end_of_text>, zero padding); without the ``regex`` and ``ftfy``
packages it falls back to ``re`` with the same classes for ASCII and common Unicode text.
"""
from __future__ import annotations

import gzip
import html
import json
import shutil
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

TEXT_ONNX = "text.onnx"
TEXT_JSON = "text.json"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pattern():
    try:
        import regex

        return regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                             regex.IGNORECASE)
    except ImportError:
        import re

        return re.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
                          re.IGNORECASE)


class BpeTokenizer:
    """CLIP's byte-level BPE (open_clip SimpleTokenizer, clean="lower"), numpy out."""

    def __init__(self, vocab_path: Path | str, context_length: int):
        self.context_length = int(context_length)
        self.byte_encoder = _bytes_to_unicode()
        merges = gzip.open(vocab_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.pattern = _pattern()
        self._cache: dict[str, str] = {}

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self._cache[token] = out
        return out

    @staticmethod
    def clean(text: str) -> str:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:  # ftfy mends mojibake; typed class names are already clean
            text = unicodedata.normalize("NFC", text)
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).strip().lower()

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:  # truncated like open_clip: the last token stays <end_of_text>
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            out[row, :len(ids)] = ids
        return out


def export_text_tower(backbone, out: Path, opset: int = 17) -> bool:
    """Write text.onnx + text.json + the vocabulary into ``out`` (a base being exported). False (nothing
    written) when the backbone's tokenizer is not CLIP's BPE, whose vocabulary this module can read."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    tokenizer = backbone.tokenizer
    if type(tokenizer) is not SimpleTokenizer or getattr(tokenizer, "reduction_fn", None) is not None:
        return False
    model = backbone.model

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model.encode_text(tokens)

    context_length = int(tokenizer.context_length)
    example = torch.as_tensor(tokenizer(["a photo of a cat.", "a"]), dtype=torch.long)
    tower = TextTower().eval()
    device = next(model.parameters()).device
    from .torch_export import no_mha_fastpath

    with no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # MHA's shape checks, constant per model
        # The tower picks each row's end-of-text position (argmax of the tokens): indices are never negative,
        # the one case the exporter warns about for advanced indexing.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(tower, (example.to(device),), str(out / TEXT_ONNX), input_names=["tokens"],
                          output_names=["features"], dynamic_axes={"tokens": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    shutil.copyfile(default_bpe(), out / VOCAB_FILE)
    (out / TEXT_JSON).write_text(json.dumps({"context_length": context_length, "vocab": VOCAB_FILE,
                                             "onnx": TEXT_ONNX, "logit_scale": float(model.logit_scale.detach().exp())},
                                            indent=2))
    return True


class TextEncoder:
    """Class names -> L2-normalised text features, from a base directory's text tower (no torch)."""

    def __init__(self, base_dir: Path | str):
        import onnxruntime as ort

        base_dir = Path(base_dir)
        meta_path = base_dir / TEXT_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"base {base_dir.name} has no text tower ({TEXT_JSON}); it was exported "
                                    "before text towers were")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = BpeTokenizer(base_dir / self.meta["vocab"], self.meta["context_length"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(base_dir / self.meta["onnx"]), options,
                                            providers=["CPUExecutionProvider"])

    def encode(self, prompts: list[str]) -> np.ndarray:
        features = self.session.run(None, {"tokens": self.tokenizer(prompts)})[0].astype(np.float32)
        return features / np.linalg.norm(features, axis=1, keepdims=True)


@lru_cache(maxsize=8)
def text_encoder(base_dir: str) -> TextEncoder:
    """One encoder per base per process (a base is immutable, so it never goes stale)."""
    return TextEncoder(base_dir)
