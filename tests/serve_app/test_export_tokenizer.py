"""`python -m serve_app.export_tokenizer DIR`: the sim app's built-in tokenizer as a Hugging Face
folder that transformers' AutoTokenizer (and so ``vllm bench serve --tokenizer DIR``) loads, counting
exactly the tokens the ingress counts."""

import json
import types

import pytest

pytest.importorskip("transformers")

from serve_app import export_tokenizer as export_mod  # noqa: E402
from serve_app.tokenizer import default_tokenizer  # noqa: E402

TEXTS = ["Hello world, how are you today?", "  leading spaces\tand tabs\nand newlines  ",
         "ünïcödé, 日本語, emoji 🚀 and digits 1234567890", "x" * 3000, ""]


@pytest.fixture(params=["the ingress's tokenizer", "rebuilt from replica.tiny_model"])
def source(request, monkeypatch):
    """Both ways the export gets the tokenizer: the ingress's own transformers tokenizer, or (an
    ingress tokenizer that keeps none) one rebuilt from `replica.tiny_model.train_tokenizer`."""
    if request.param.startswith("rebuilt"):
        monkeypatch.setattr("serve_app.tokenizer.default_tokenizer", lambda: types.SimpleNamespace())
    return request.param


def test_the_exported_folder_loads_with_autotokenizer_and_counts_as_the_ingress(tmp_path, source):
    from transformers import AutoTokenizer

    folder = export_mod.export_tokenizer(tmp_path / "sim-tokenizer")
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 and 5 both load it
    hf = AutoTokenizer.from_pretrained(str(folder))
    ingress = default_tokenizer()
    assert hf.num_special_tokens_to_add() == 0  # no BOS: the sim ingress counts none
    assert len(hf) == ingress.vocab_size
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    for text in TEXTS:
        ids = hf(text).input_ids
        assert ids == hf(text, add_special_tokens=False).input_ids == ingress.encode(text)
        assert hf.decode(ids) == text
    # the simulated engine's output text is made of the same tokens
    assert hf.decode([ingress.sim_token_id(n) for n in range(5)]) == "".join(ingress.sim_token_text(n)
                                                                            for n in range(5))


def test_the_command_writes_the_folder_and_says_where(tmp_path, capsys):
    assert export_mod.main([str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert "--tokenizer " + str(tmp_path / "tok") in capsys.readouterr().out
    assert export_mod.main([]) == 2
    assert "usage: python -m serve_app.export_tokenizer DIR" in capsys.readouterr().err
    assert export_mod.main(["--help"]) == 0
