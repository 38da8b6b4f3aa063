"""The simulated engine's built-in tokenizer as a Hugging Face tokenizer folder, for clients that
count tokens themselves: ``python -m serve_app.export_tokenizer DIR``.

The sim app has no model folder: its ingress counts tokens with a built-in byte-level BPE
(`serve_app.tokenizer.default_tokenizer`, trained by `replica.tiny_model.train_tokenizer`).  This
writes that tokenizer to ``DIR`` (``tokenizer.json``, ``tokenizer_config.json`` and what else
transformers' ``save_pretrained`` writes), loadable by ``AutoTokenizer.from_pretrained(DIR)``, so that
``vllm bench serve --tokenizer DIR`` (or GuideLLM's ``--processor DIR``) builds prompts of the
lengths asked for and counts the tokens the app counts: same vocabulary, merges and special tokens,
no BOS added on encode (the sim ingress counts none), and the sim's chat template where the ingress
has one.  For the vLLM app, point those clients at the model folder instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["export_tokenizer", "main"]


def _hf_tokenizer() -> Any:
    """The ingress's built-in tokenizer as a transformers fast tokenizer."""
    from serve_app.tokenizer import default_tokenizer

    hf = getattr(default_tokenizer(), "hf", None)  # the ingress's own transformers tokenizer, if it keeps one
    if hf is not None:
        return hf
    from transformers import PreTrainedTokenizerFast

    from replica.tiny_model import BOS, EOS, PAD, UNK, train_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)


def export_tokenizer(folder: str | Path) -> Path:
    """Write the built-in tokenizer to ``folder`` (created if needed; its tokenizer files replaced);
    returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _hf_tokenizer().save_pretrained(str(folder))
    # transformers 5 names its class TokenizersBackend, which transformers 4 (a client's) does not
    # know; PreTrainedTokenizerFast loads in both
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") != "PreTrainedTokenizerFast":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: python -m serve_app.export_tokenizer DIR",
              file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    folder = export_tokenizer(argv[0])
    print(f"serve_app: the built-in tokenizer is in {folder} (e.g. vllm bench serve --tokenizer {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
