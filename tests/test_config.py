import pytest

from boxmask.config import Config, ConfigError, load_config, parse_override
from boxmask.engine.trainer import lr_factor


def test_overrides_and_types():
    cfg = load_config("configs/tiny.yaml", ["solver.lr=0.5", "data.min_size_train=[10,20]", "data.hflip=0",
                                            "amp=false", "method=full"])
    assert cfg.solver.lr == 0.5 and cfg.data.min_size_train == [10, 20] and cfg.amp is False and cfg.method == "full"
    assert cfg.model.backbone == "resnet18"  # from the YAML
    assert Config().model.backbone == "resnet50"  # defaults untouched
    assert parse_override("a.b=1") == {"a": {"b": 1}}


@pytest.mark.parametrize("bad, words", [
    (["solver.lr=x"], "solver.lr"), (["nope=1"], "unknown config key 'nope'"), (["method=mask"], "method"),
    (["solver"], "key=value"), (["model=3"], "section"), (["solver.max_iters=1.5"], "solver.max_iters"),
])
def test_bad_overrides(bad, words):
    with pytest.raises(ConfigError, match=words):
        load_config("configs/tiny.yaml", bad)


def test_presets_load():
    cfg = load_config("configs/boxinst_R50_1x.yaml")
    assert cfg.solver.max_iters == 90000 and cfg.solver.ims_per_batch == 16
    # steps given in iterations: LR drops x10 at 60k and 80k, after a 1000-iteration warm-up
    assert lr_factor(cfg, 0) == pytest.approx(0.001)
    assert lr_factor(cfg, 30000) == pytest.approx(1.0)
    assert lr_factor(cfg, 60000) == pytest.approx(0.1)
    assert lr_factor(cfg, 85000) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/none.yaml")
