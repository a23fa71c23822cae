import pytest
import torch

from nern.config import FitConfig, PretrainConfig, check_overrides, flatten, load_config, read_yaml, to_dict
from nern.errors import NernError


def test_defaults_are_paper_resnet20():
    cfg = load_config(FitConfig)
    assert cfg.predictor.hidden == 180 and cfg.embedding.levels == 40 and cfg.embedding.base == 0.76
    assert cfg.sampling.method == "random_weighted_batch" and cfg.sampling.batch == 4096
    assert cfg.loss.kd == 1e-4 and cfg.optim.lr == 5e-3


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("predictor:\n  hidden: 140\nloss:\n  kd: 0\n")
    cfg = load_config(FitConfig, f, ["predictor.hidden=160", "sampling.method=all", "optim.betas=[0.9,0.99]"])
    assert cfg.predictor.hidden == 160 and cfg.loss.kd == 0.0 and cfg.sampling.method == "all"
    assert cfg.optim.betas == [0.9, 0.99]


@pytest.mark.parametrize("override,needle", [
    (["predictor.hiden=3"], "predictor.hiden"),
    (["sampling.method=bogus"], "random_weighted_batch"),
    (["predictor.hidden=-5"], "predictor.hidden"),
    (["predictor.hidden=abc"], "predictor.hidden"),
    (["sampling.uniform_prob=1.5"], "sampling.uniform_prob"),
    (["nonsense=1"], "nonsense"),
    (["device=gpu"], "not a torch device"),
    (["loss.ce=-1"], "loss.ce"),
    (["loss.ce=0.5", "data_free=true"], "loss.ce"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(NernError, match=needle.replace(".", r"\.")):
        load_config(FitConfig, None, override)


def test_flatten_roundtrip_keys():
    flat = flatten(to_dict(FitConfig()))
    assert flat["predictor.hidden"] == 180 and "model.arch" in flat


def test_flatten_takes_nested_and_dotted_keys_and_none():
    """The one flatten of the package: configs, MLflow params and the pipeline's per-job overrides."""
    assert flatten({"loss": {"kd": 0, "fmd": {"x": 1}}, "optim.lr": 2}) == {"loss.kd": 0, "loss.fmd.x": 1, "optim.lr": 2}
    assert flatten(None) == {} and flatten({}) == {}


def test_read_yaml_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(NernError, match="manifest not found: .*m.yaml; run the pipeline"):
        read_yaml(tmp_path / "m.yaml", "manifest", fix="run the pipeline")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(NernError, match="manifest .*list.yaml must hold a mapping"):
        read_yaml(tmp_path / "list.yaml", "manifest")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(NernError, match="config file .*bad.yaml is not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")


def test_check_overrides_checks_keys_and_types_but_not_ranges():
    check_overrides(FitConfig, ["predictor.depth=1", "iterations=null"])  # invalid alone, fine merged
    with pytest.raises(NernError, match=r"predictor\.hiden"):
        check_overrides(FitConfig, ["predictor.hiden=3"])
    with pytest.raises(NernError, match=r"predictor\.hidden"):
        check_overrides(FitConfig, ["predictor.hidden=abc"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_gpu_on_a_machine_without_one_fails_before_any_data_is_read():
    with pytest.raises(NernError, match=r"'device'.*no CUDA GPU.*device=cpu"):
        load_config(FitConfig, None, ["device=cuda"])
    with pytest.raises(NernError, match=r"'device'.*no CUDA GPU"):
        load_config(PretrainConfig, None, ["device=cuda:1"])


def test_autocast_bf16_takes_true_false_or_auto_and_auto_follows_the_device(monkeypatch):
    """'auto' turns bf16 on only where the device computes in bf16 natively (emulated bf16 is slower than fp32)."""
    import nern.config as config_mod

    assert load_config(FitConfig, None, ["autocast_bf16=auto"]).autocast_bf16 == "auto"
    assert load_config(PretrainConfig, None, ["autocast_bf16=true"]).autocast_bf16 is True
    with pytest.raises(NernError, match="autocast_bf16.*true or false.*auto"):
        load_config(FitConfig, None, ["autocast_bf16=maybe"])
    assert config_mod.use_bf16(True, "cpu") and not config_mod.use_bf16(False, "cpu")
    for native in (True, False):
        monkeypatch.setattr(config_mod, "bf16_native", lambda device, native=native: native)
        assert config_mod.use_bf16("auto", "cpu") is native
        # "reconstruction": as "auto" in the reconstruction-only steps, never in distillation
        assert config_mod.use_bf16("reconstruction", "cpu", reconstruction_phase=True) is native
        assert config_mod.use_bf16("reconstruction", "cpu") is False
    assert not config_mod.bf16_native("meta")
    assert load_config(FitConfig, None, ["autocast_bf16=reconstruction"]).autocast_bf16 == "reconstruction"
    with pytest.raises(NernError, match="autocast_bf16.*'auto'.*'reconstruction'"):
        load_config(FitConfig, None, ["autocast_bf16=rec"])
    with pytest.raises(NernError, match="autocast_bf16"):  # a pretrain has no reconstruction phase
        load_config(PretrainConfig, None, ["autocast_bf16=reconstruction"])
