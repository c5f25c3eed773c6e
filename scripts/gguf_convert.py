"""Run llama.cpp's convert_hf_to_gguf.py on a checkpoint whose BPE pre-tokenizer it does not know.

The converter identifies pre-tokenizers by hashing known public models' tokenizations; the demo's
tokenizer (ByteLevel with the GPT-2 split regex) is not among them, so this answers "gpt-2" for it
(and, as there is no SentencePiece model, skips
looking for one), and runs the converter unchanged otherwise (as BENCHMARKS.md's llama.cpp section describes).

    python scripts/gguf_convert.py LLAMA_CPP_DIR CHECKPOINT --outtype f16 --outfile model-f16.gguf
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: gguf_convert.py LLAMA_CPP_DIR CHECKPOINT [convert_hf_to_gguf.py options]")
    root = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base  # llama.cpp's converter package

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"

    def no_sentencepiece(self):  # no tokenizer.model: let the converter fall through to tokenizer.json
        raise FileNotFoundError("no SentencePiece model")

    base.TextModel._create_vocab_sentencepiece = no_sentencepiece
    sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
