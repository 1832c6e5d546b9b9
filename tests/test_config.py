"""Options: defaults, YAML, command-line overrides, and the errors for unknown or bad keys."""

import glob
import os

import pytest

from cnqlora.config import dump_yaml, parse_options
from cnqlora.errors import UserError
from cnqlora.training import TRAIN_SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    return parse_options(TRAIN_SECTIONS, argv, prog="baichuan_qlora.py")


def test_defaults_reproduce_the_baichuan_msra_run():
    model, prompt, data, lora, train = parse([])
    assert model.model_name_or_path == "model_hub/baichuan-7B"
    assert model.quantization == "4bit" and not model.trust_remote_code
    assert data.train_file == "data/msra/train.txt" and data.dev_file == "data/msra/dev.txt"
    assert lora.lora_target == ["all-linear"]
    assert os.path.join(train.output_dir, train.run_name, "adapter_model") == "checkpoint/baichuan/adapter_model"


def test_yaml_then_command_line_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\nlora_r: 16\nlora_target: [W_pack, o_proj]\ndev_file: null\n"
                    "memory_mode: fast\n", encoding="utf-8")
    model, prompt, data, lora, train = parse(["--config", str(path), "--lora_r", "32", "--memory_mode", "lean"])
    # YAML 1.1 reads 3e-4 as a string; the option is still a float.
    assert train.learning_rate == pytest.approx(3e-4)
    assert lora.lora_r == 32
    assert lora.lora_target == ["W_pack", "o_proj"]
    assert data.dev_file is None
    assert train.memory_mode == "lean"


def test_seed_alias_and_comma_lists():
    model, _, _, lora, _ = parse(["--base_model", "x/y", "--lora_target", "W_pack,down_proj"])
    assert model.model_name_or_path == "x/y"
    assert lora.lora_target == ["W_pack", "down_proj"]


def test_unknown_yaml_key_names_file_line_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\n# comment\nlerning_rate: 1e-4\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        parse(["--config", str(path)])
    assert f"{path}:3: unknown option 'lerning_rate' (did you mean 'learning_rate'?)" in str(e.value)


def test_bad_values_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: eight\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c.yaml:1: lora_r must be an integer"):
        parse(["--config", str(path)])
    with pytest.raises(UserError, match="quantization must be one of 4bit, 8bit, none"):
        parse(["--quantization", "3bit"])
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        parse(["--batch_size", "0"])


def test_unknown_command_line_option_is_an_error_with_a_suggestion():
    with pytest.raises(UserError, match=r"^unknown option --lerning_rate; did you mean --learning_rate\?$"):
        parse(["--lerning_rate", "1"])


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    for section in TRAIN_SECTIONS:
        for name in section.__dataclass_fields__:
            assert f"--{name}" in out
    # list options show their default as the command line takes it, and say when it is empty
    assert "(default: all-linear)" in out and "(default: empty)" in out


def test_resolved_config_round_trips(tmp_path):
    sections = parse(["--lora_r", "4", "--run_name", "x"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(*sections), encoding="utf-8")
    assert parse(["--config", str(path)]) == sections


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_parses(path):
    import yaml

    sections = parse(["--config", path])
    parsed = {name: getattr(section, name) for section in sections for name in section.__dataclass_fields__}
    with open(path, encoding="utf-8") as f:
        written = yaml.safe_load(f)
    # every key the file sets reaches its option (lists may be written as comma-separated text)
    for key, value in written.items():
        got = parsed[key]
        assert got == value or (isinstance(got, list) and ",".join(got) == value), (key, got, value)


def test_prediction_reads_only_model_and_prompt_from_a_training_config(tmp_path):
    from cnqlora.data import PromptArgs
    from cnqlora.inference import PREDICT_SECTIONS
    from cnqlora.models import ModelArgs

    path = tmp_path / "train_config.yaml"
    path.write_text("model_name_or_path: m/x\ntemplate: alpaca\nbatch_size: 3\nlearning_rate: 1e-4\nseed: 7\n",
                    encoding="utf-8")
    model, prompt, predict, gen = parse_options(PREDICT_SECTIONS, ["--config", str(path)],
                                                ignored_sections=TRAIN_SECTIONS, yaml_sections=[ModelArgs, PromptArgs])
    assert model.model_name_or_path == "m/x" and prompt.template == "alpaca"
    assert gen.batch_size == 128 and gen.seed == 42  # the training values are not the prediction values
    path.write_text("model_name_or_path: m/x\nbatch_sise: 3\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown option 'batch_sise' \\(did you mean 'batch_size'\\?\\)"):
        parse_options(PREDICT_SECTIONS, ["--config", str(path)], ignored_sections=TRAIN_SECTIONS,
                      yaml_sections=[ModelArgs, PromptArgs])


def test_the_readme_documents_every_option():
    import dataset
    import test_baichuan
    from cnqlora.inference import PREDICT_SECTIONS
    from cnqlora.serving import ServeArgs

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    sections = TRAIN_SECTIONS + PREDICT_SECTIONS + [ServeArgs, test_baichuan.CheckArgs, dataset.DatasetArgs]
    missing = [f"{cls.__name__}.{name}" for cls in sections for name in cls.__dataclass_fields__
               if f"`{name}`" not in readme and f"`--{name}`" not in readme and f"--{name}" not in readme]
    assert not missing
