"""One vocabulary on the command line (`--model`, `--device`, `-k/--top-k`, `--output-dir`), and `load_model`, the one
way every command and job loads its CLaRa."""

import json
import re

import pytest
import torch
from conftest import make_tiny_clara

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.cli import COMMANDS, build_parser
from modeling_clara.cli import main as clara_main
from modeling_clara.loading import is_clara_checkpoint, load_model

# Per command (index subcommands by their path): which shared options it takes.
OUTPUT_DIR_COMMANDS = (("index", "build"), ("eval",), ("eval-retrieval",), ("synthesize",), ("convert",))
TOP_K_COMMANDS = (("index", "search"), ("ask",), ("eval",))
MODEL_COMMANDS = (("index", "build"), ("index", "search"), ("index", "add"), ("ask",), ("eval",), ("eval-retrieval",),
                  ("convert",))


def help_text(command: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser(command[0]).parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", OUTPUT_DIR_COMMANDS, ids=" ".join)
def test_outputs_go_to_output_dir(command, capsys):
    text = help_text(command, capsys)
    assert "--output-dir" in text
    assert "--out " not in text and "--out," not in text and "--output_dir" not in text


@pytest.mark.parametrize("command", TOP_K_COMMANDS, ids=" ".join)
def test_top_k_defaults_to_the_models_generation_top_k(command, capsys):
    text = " ".join(help_text(command, capsys).split())
    assert re.search(r"-k TOP_K( \[TOP_K \.\.\.\])?, --top-k TOP_K", text), text  # eval takes several
    assert "(default: the model's generation_top_k)" in text


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_model_is_spelled_and_explained_once(command, capsys):
    text = " ".join(help_text(command, capsys).split())
    assert "--model MODEL" in text
    if command != ("convert",):
        assert "a CLaRa: `shipped` (the one in this package), a saved folder or Hub id" in text
        assert "--device DEVICE" in text


def test_every_command_is_covered():
    covered = {command[0] for command in OUTPUT_DIR_COMMANDS + TOP_K_COMMANDS + MODEL_COMMANDS}
    # train is the Trainer's argument parser (`--output-dir` is its alias of `--output_dir`); serve writes nothing.
    assert covered | {"train", "serve"} == set(COMMANDS)


def test_a_deprecated_spelling_still_works_with_a_warning(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Paris is in France.", "Rome is in Italy.")))
    with pytest.warns(FutureWarning, match="--out is deprecated; use --output-dir"):
        assert clara_main(["index", "build", "--model", str(tmp_path / "model"), "--corpus", str(corpus),
                           "--out", str(tmp_path / "idx")]) == 0
    assert len(ClaraIndex.load(tmp_path / "idx")) == 2
    with pytest.raises(SystemExit), pytest.warns(FutureWarning):  # one output option, not both
        clara_main(["index", "build", "--model", str(tmp_path / "model"), "--corpus", str(corpus),
                    "--out", str(tmp_path / "a"), "--output-dir", str(tmp_path / "b")])


def test_convert_round_trip_with_model_and_output_dir(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir)
    model.save_pretrained(tmp_path / "ours")
    assert clara_main(["convert", "hf-to-apple", "--model", str(tmp_path / "ours"), "--output-dir",
                       str(tmp_path / "apple")]) == 0
    assert clara_main(["convert", "apple-to-hf", "--model", str(tmp_path / "apple"), "--output-dir",
                       str(tmp_path / "again")]) == 0
    again = ClaraForRAG.from_pretrained(str(tmp_path / "again"))
    for key, value in model.clara_state_dict().items():
        torch.testing.assert_close(again.clara_state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="needs --model"):
        clara_main(["convert", "hf-to-apple", "--output-dir", str(tmp_path / "x")])


# ----------------------------------------------------------------------------------------------------------------
# load_model


def test_checkpoints_and_backbones_are_told_apart(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "clara")
    assert is_clara_checkpoint(tmp_path / "clara") and is_clara_checkpoint("shipped")
    assert not is_clara_checkpoint(tiny_llama_dir) and not is_clara_checkpoint("embedded")
    assert not is_clara_checkpoint(tmp_path / "no such folder")
    with pytest.raises(FileNotFoundError, match="no model at .*no such folder"):
        load_model(tmp_path / "no such folder")


def test_load_model_reads_a_saved_clara_as_from_pretrained_does(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path / "clara")
    loaded = load_model(tmp_path / "clara", device="cpu")
    reference = ClaraForRAG.from_pretrained(str(tmp_path / "clara"))
    assert not loaded.training and loaded.device.type == "cpu"
    docs = ["The Seine flows through Paris.", "Kilimanjaro is in Tanzania."]
    torch.testing.assert_close(loaded.compress(docs), reference.compress(docs), rtol=0, atol=0)
    assert load_model(tmp_path / "clara", generation_top_k=1).config.generation_top_k == 1  # a config override


def test_load_model_builds_a_seeded_fresh_clara_on_a_backbone(tiny_llama_dir):
    first, second = (load_model(tiny_llama_dir, seed=3, doc_max_length=32, compr_rate=8) for _ in range(2))
    other = load_model(tiny_llama_dir, seed=4, doc_max_length=32, compr_rate=8)
    assert first.n_mem_tokens == 4 and first.config.decoder_model_name == str(tiny_llama_dir)
    docs = ["The Seine flows through Paris."]
    torch.testing.assert_close(first.compress(docs), second.compress(docs), rtol=0, atol=0)
    assert not torch.equal(first.compress(docs), other.compress(docs))
