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


# --- every value validated at load ------------------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from boxmask.config import (CHOICES, FREE_TEXT, LENGTHS, PRESETS_DIR, RANGES, _leaves, preset_names,  # noqa: E402
                            scale_for_batch)


@pytest.mark.parametrize("override, key", [
    ("checkpoint_period=0", "checkpoint_period"), ("log_period=0", "log_period"),
    ("data.min_size_train=[]", "data.min_size_train"), ("data.num_workers=-1", "data.num_workers"),
    ("solver.lr=nan", "solver.lr"), ("solver.lr=.nan", "solver.lr"), ("solver.lr=-1", "solver.lr"),
    ("solver.lr=inf", "solver.lr"), ("solver.lr=.inf", "solver.lr"), ("device=foo", "device"),
    ("device=cuda:x", "device"), ("data.max_size=0", "data.max_size"), ("eval_period=-1", "eval_period"),
    ("data.hflip=2", "data.hflip"), ("sim.ema_momentum=1", "sim.ema_momentum"),
    ("sim.proto_momentum=-0.1", "sim.proto_momentum"), ("model.score_thresh=1.5", "model.score_thresh"),
    ("model.nms_thresh=-0.1", "model.nms_thresh"), ("data.pixel_std=[1,0,1]", "data.pixel_std"),
    ("data.pixel_mean=[1,2]", "data.pixel_mean"), ("model.fpn_strides=[8,16,64]", "model.fpn_strides"),
    ("model.mask_out_stride=3", "model.mask_out_stride"), ("loss.pairwise_size=4", "loss.pairwise_size"),
    ("model.fpn_channels=50", "model.fpn_channels"), ("sim.tau_low=0.9", "sim.tau_low"),
    ("data.min_size_train=[64,nan]", "data.min_size_train"), ("solver.steps=[0.5,inf]", "solver.steps"),
    ("seed=-1", "seed"), ("amp=2", "amp"), ("amp=[]", "amp"), ("out=", "out"),
    ("model.backbone=resnet9", "model.backbone"), ("model.head_norm=bn", "model.head_norm"),
    ("solver.max_iters=1e400", "solver.max_iters"), ("solver.ims_per_batch=true", "solver.ims_per_batch"),
    ("seed=2020-13-45", "seed"), ("solver.lr=" + "[" * 1200 + "]" * 1200, "solver.lr"),  # not YAML: taken as text
])
def test_bad_values_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_every_setting_has_a_rule():
    """A new setting must say its range (numbers) or its choices (names): nothing is accepted unchecked."""
    for key, value, typ in _leaves(Config()):
        inner = typ.__args__[0] if getattr(typ, "__origin__", None) is list else typ
        if inner in (int, float):
            assert key in RANGES or key in LENGTHS, f"{key} has no range in boxmask.config.RANGES"
        elif inner is str:
            assert key in CHOICES or key in FREE_TEXT, f"{key} has no choices in boxmask.config.CHOICES"
    known = {k for k, _, _ in _leaves(Config())}
    assert set(RANGES) <= known and set(CHOICES) <= known and set(FREE_TEXT) <= known


def _outside(spec: str, is_int: bool) -> list:
    """Values just outside a range spec."""
    step = 1 if is_int else 1e-3
    if spec.startswith(">="):
        return [float(spec[2:]) - step]
    if spec.startswith(">"):
        return [float(spec[1:]) - (0 if is_int else 0.0)]
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return [lo - step if spec[0] == "[" else lo, hi + step if spec[-1] == "]" else hi]


def test_every_range_is_enforced_and_every_float_must_be_finite():
    defaults = {k: (v, t) for k, v, t in _leaves(load_config("configs/tiny.yaml"))}
    for key, spec in RANGES.items():
        value, typ = defaults[key]
        is_list = isinstance(value, list)
        inner = typ.__args__[0] if is_list else typ
        for bad in _outside(spec, inner is int):
            bad = int(bad) if inner is int else bad
            text = f"{key}={[bad] * max(len(value), 1) if is_list else bad}"
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config("configs/tiny.yaml", [text])
        if inner is float:
            for bad in (".nan", ".inf", "-.inf"):
                with pytest.raises(ConfigError, match="finite"):
                    load_config("configs/tiny.yaml", [f"{key}={'[' + bad + ']' if is_list else bad}"])


def test_presets_and_defaults_validate():
    Config()  # the defaults are valid
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.device == "auto", f"preset {name} should pick its device itself"


def test_text_keys_take_the_value_as_typed():
    cfg = load_config("configs/tiny.yaml", ["out=yes", "data.train_json=1e3", "device=cuda:1", "model.weights=null"])
    assert cfg.out == "yes" and cfg.data.train_json == "1e3" and cfg.device == "cuda:1"
    assert cfg.model.weights == "null"


overrides_keys = st.sampled_from([k for k, _, _ in _leaves(Config())]
                                 + ["nope", "solver", "solver.lr.x", "", "data..x", "sim", "user_keys"])
scalar = st.one_of(st.integers(min_value=-10**30, max_value=10**30), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(), st.none(), st.text(max_size=12))
value_text = st.one_of(
    scalar.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.lists(scalar, max_size=4).map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
    st.text(max_size=16),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "[]", "{}", "{a: 1}", "[[1]]", "!!binary aGk=", "2020-01-01",
                     "!!set {a}", "0x10", "1_000", "cuda:0", "- 1", "2020-13-45", "&a [*a]",
                     "!!python/object:os.system ls", "a\nb"]))


@settings(max_examples=400, deadline=None)
@given(ovs=st.lists(st.tuples(overrides_keys, value_text), max_size=4), world=st.integers(1, 64),
       preset=st.sampled_from([None, "tiny", "sim_tiny", "boxinst_R50_1x"]))
def test_random_overrides_give_a_config_or_a_config_error(ovs, world, preset):
    try:
        cfg = load_config(preset, [f"{k}={v}" for k, v in ovs])
        scaled, _ = scale_for_batch(cfg, world)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for _, v, _ in _leaves(scaled):
        assert not (isinstance(v, float) and not math.isfinite(v))


yaml_tree = st.recursive(scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                        st.dictionaries(st.one_of(overrides_keys, st.text(max_size=6)),
                                                                        kids, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(doc=st.one_of(yaml_tree, st.dictionaries(st.sampled_from(["data", "model", "sim", "solver", "loss", "_base_"]),
                                                 st.dictionaries(overrides_keys.map(lambda k: k.split(".")[-1]),
                                                                 scalar, max_size=4), max_size=3)),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_random_yaml_files_give_a_config_or_a_config_error(tmp_path_factory, doc, raw):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e)


# --- presets shipped in the package -------------------------------------------------------------------

def test_presets_by_name_by_path_and_by_the_old_configs_path(tmp_path, monkeypatch):
    by_name = load_config("mobilenet_v2_192")
    assert by_name.model.backbone == "mobilenet_v2" and by_name.solver.optimizer == "adamw"  # _base_: tiny.yaml
    assert load_config("mobilenet_v2_192.yaml") == by_name
    monkeypatch.chdir(tmp_path)  # away from any checkout
    assert load_config("configs/mobilenet_v2_192.yaml") == by_name
    assert load_config(PRESETS_DIR / "mobilenet_v2_192.yaml") == by_name
    own = tmp_path / "mine.yaml"
    own.write_text("_base_: mobilenet_v2_192\nsolver:\n  max_iters: 7\n")
    assert load_config(own).solver.max_iters == 7 and load_config(own).model.backbone == "mobilenet_v2"
    # a file on disk wins over the preset of the same name
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("solver:\n  max_iters: 5\n")
    assert load_config("configs/tiny.yaml").solver.max_iters == 5
    with pytest.raises(ConfigError, match="presets: .*mobilenet_v2_192.*tiny"):
        load_config("mobilenet")
    with pytest.raises(ConfigError, match="mine2.yaml"):
        load_config("elsewhere/mine2.yaml")  # a missing file outside configs/ is not replaced by a preset
    bad_base = tmp_path / "b.yaml"
    bad_base.write_text("_base_: nothing_here.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: _base_: .*nothing_here"):
        load_config(bad_base)


def test_presets_are_package_data():
    project = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    section = project[project.index("[tool.setuptools.package-data]"):]
    patterns = re.findall(r'"([^"]+)"', re.search(r"^boxmask = \[(.*?)\]", section, re.M).group(1))
    assert PRESETS_DIR == Path(__import__("boxmask").__file__).resolve().parent / "configs"
    files = sorted(PRESETS_DIR.glob("*.yaml"))
    assert len(files) >= 10 and all(any(f.relative_to(PRESETS_DIR.parent).match(p) for p in patterns) for f in files)
    assert not (Path(__file__).resolve().parent.parent / "configs").exists()  # one copy only


def test_user_keys_are_the_overridden_ones():
    cfg = load_config("configs/tiny.yaml", ["solver.max_iters=40", "solver={lr: 0.1}", "method=sim"])
    assert cfg.user_keys == {"solver.max_iters", "solver.lr", "method"}
    assert load_config("configs/tiny.yaml").user_keys == frozenset()
    assert "user_keys" not in __import__("boxmask.config", fromlist=["to_dict"]).to_dict(cfg)


def test_cut_confidence_keys_are_refused_without_the_cut():
    with pytest.raises(ConfigError, match=r"'sim\.pairwise_cut_high' only acts with sim\.pairwise_pseudo_cut=true"):
        load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=false", "sim.pairwise_cut_high=0.9"])
    cfg = load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=true", "sim.pairwise_cut_high=0.9",
                             "sim.pairwise_cut_low=0.1"])
    assert (cfg.sim.pairwise_cut_high, cfg.sim.pairwise_cut_low) == (0.9, 0.1)
    with pytest.raises(ConfigError, match=r"'sim\.pairwise_cut_min_side' only acts with"):
        load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=false", "sim.pairwise_cut_min_side=10"])
    with pytest.raises(ConfigError, match=r"sim\.pairwise_cut_min_side"):
        load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=true", "sim.pairwise_cut_min_side=-1"])
    assert load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=true",
                              "sim.pairwise_cut_min_side=10"]).sim.pairwise_cut_min_side == 10
    with pytest.raises(ConfigError, match=r"'sim\.pairwise_cut_until' only acts with"):
        load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=false", "sim.pairwise_cut_until=0.8"])
    with pytest.raises(ConfigError, match=r"'sim\.pairwise_cut_until' \(0\.3\) must be above sim\.warmup_frac \(0\.4\)"):
        load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=true", "sim.warmup_frac=0.4", "sim.pairwise_cut_until=0.3"])
    with pytest.raises(ConfigError, match=r"sim\.pairwise_cut_until"):
        load_config(None, ["method=sim", "sim.pairwise_pseudo_cut=true", "sim.pairwise_cut_until=1.5"])
    with pytest.raises(ConfigError, match=r"sim\.pseudo_bg_margin"):
        load_config(None, ["method=sim", "sim.pseudo_bg_margin=-1"])
    assert load_config(None, ["method=sim", "sim.pseudo_bg_margin=2"]).sim.pseudo_bg_margin == 2
    with pytest.raises(ConfigError, match=r"'sim\.pseudo_rim' only acts with sim\.pseudo_target=rim or soft_rim; "
                                          r"got sim\.pseudo_target=soft"):
        load_config(None, ["method=sim", "sim.pseudo_rim=2"])
    with pytest.raises(ConfigError, match=r"sim\.pseudo_rim"):
        load_config(None, ["method=sim", "sim.pseudo_target=rim", "sim.pseudo_rim=0"])
    assert load_config(None, ["method=sim", "sim.pseudo_target=rim", "sim.pseudo_rim=2"]).sim.pseudo_rim == 2
    assert load_config(None, ["method=sim", "sim.pseudo_target=soft_rim", "sim.pseudo_rim=2"]).sim.pseudo_rim == 2
    with pytest.raises(ConfigError, match=r"'sim\.hard_target_until' only acts with sim\.pseudo_target other than hard"):
        load_config(None, ["method=sim", "sim.pseudo_target=hard", "sim.hard_target_until=0.6"])
    with pytest.raises(ConfigError, match=r"'sim\.hard_target_until' \(0\.3\) must be 0 or above sim\.warmup_frac \(0\.4\)"):
        load_config(None, ["method=sim", "sim.warmup_frac=0.4", "sim.hard_target_until=0.3"])
    with pytest.raises(ConfigError, match=r"sim\.hard_target_until"):
        load_config(None, ["method=sim", "sim.hard_target_until=1.5"])
    assert load_config(None, ["method=sim", "sim.warmup_frac=0.2", "sim.hard_target_until=0.6"]).sim.hard_target_until == 0.6
    with pytest.raises(ConfigError, match=r"'sim\.hard_target_min_share' only acts with sim\.pseudo_target other"):
        load_config(None, ["method=sim", "sim.pseudo_target=hard", "sim.hard_target_min_share=0.01"])
    with pytest.raises(ConfigError, match=r"sim\.hard_target_min_share"):
        load_config(None, ["method=sim", "sim.hard_target_min_share=-0.1"])
    assert load_config(None, ["method=sim", "sim.hard_target_min_share=0.01"]).sim.hard_target_min_share == 0.01
    # the texture gate: its feature key only with the gate on, c2 or c3, a threshold in [0, 1)
    with pytest.raises(ConfigError, match=r"'sim\.pairwise_texture_features' only acts with sim\.pairwise_texture_thresh"):
        load_config(None, ["method=sim", "sim.pairwise_texture_features=c2"])
    with pytest.raises(ConfigError, match=r"sim\.pairwise_texture_features"):
        load_config(None, ["method=sim", "sim.pairwise_texture_thresh=0.2", "sim.pairwise_texture_features=c4"])
    with pytest.raises(ConfigError, match=r"sim\.pairwise_texture_thresh"):
        load_config(None, ["method=sim", "sim.pairwise_texture_thresh=1.0"])
    gate = load_config(None, ["method=sim", "sim.pairwise_texture_thresh=0.2", "sim.pairwise_texture_features=c2"]).sim
    assert (gate.pairwise_texture_thresh, gate.pairwise_texture_features) == (0.2, "c2")


def test_semantic_map_keys_are_refused_while_the_semantic_map_is_off():
    with pytest.raises(ConfigError, match=r"'sim\.num_prototypes', 'sim\.alpha' only act through the semantic map"):
        load_config(None, ["method=sim", "sim.num_prototypes=3", "sim.alpha=0.7"])
    assert load_config(None, ["method=sim", "sim.semantic=true", "sim.num_prototypes=3"]).sim.num_prototypes == 3
    assert load_config(None, ["method=boxinst", "sim.num_prototypes=3"]).sim.num_prototypes == 3
    assert load_config("sim_R50_1x").sim.num_prototypes == 10  # a preset's values are not typed keys
