"""A training step's forward and losses wait on the device only once: for the number of instances fed
to the mask head (the one data-dependent shape). On a GPU every host sync stalls the launch queue."""
import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from boxmask.config import load_config
from boxmask.data.batch import TrainDataset, collate
from boxmask.data.coco import CocoDataset
from boxmask.engine.trainer import build_model
from boxmask.modeling.sim import method as sim_method
from boxmask.modeling.sim.method import SIM

from .test_end_to_end import TINY

BOXMASK = str(Path(__file__).resolve().parents[1] / "boxmask")
# calls that read a tensor's value back to the host (or whose output shape depends on values)
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "masked_select",
         "repeat_interleave", "bincount"}


class HostSyncs(TorchFunctionMode):
    """Counts value-dependent calls made from boxmask's own code, by call site."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        hit = name in READS
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
        if hit:
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(BOXMASK)]
            if frames:
                self.calls[f"{name} {Path(frames[-1].filename).name}:{frames[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["boxinst", "sim", "sim-texture", "sim-texgate"])
@pytest.mark.parametrize("images", [2, 4])
def test_one_host_sync_per_step(synth_data, method, images, monkeypatch):
    # the device path (on a CPU, the prototype update selects its pixels with a sync that costs nothing)
    monkeypatch.setattr(sim_method, "select_pixels_on_host", lambda device: False)
    texture = {"sim-texture": ["sim.texture_map=true"], "sim-texgate": ["sim.pairwise_texture_thresh=0.5"]}.get(method, [])
    method = method.split("-")[0]
    cfg = load_config("configs/tiny.yaml", [f"method={method}", *TINY, "sim.copy_paste=false", *texture])
    ds = CocoDataset(synth_data / "train.json", synth_data / "images")
    td = TrainDataset(ds, cfg.data.min_size_train, cfg.data.max_size, cfg.data.hflip, False)
    batch = collate([td[(i, 0)] for i in range(images)])
    torch.manual_seed(0)
    model = build_model(cfg, len(ds.cat_ids)).train()
    sim = SIM(cfg, model, len(ds.cat_ids)) if method == "sim" else None
    with HostSyncs() as syncs:
        losses, aux = model(batch, return_aux=True)
        if sim is not None:
            losses.update(sim.losses(batch, aux, pseudo_on=True)[0])
    assert aux["inst"]["image"].numel() > 0  # the instance paths ran
    assert list(syncs.calls) == [next(k for k in syncs.calls if k.startswith("nonzero condinst.py"))], syncs.calls
    assert sum(syncs.calls.values()) == 1, syncs.calls


def test_prototype_update_same_on_host_and_device_paths(synth_data, monkeypatch):
    cfg = load_config("configs/tiny.yaml", ["method=sim", *TINY, "sim.copy_paste=false", "sim.semantic=true"])
    ds = CocoDataset(synth_data / "train.json", synth_data / "images")
    td = TrainDataset(ds, cfg.data.min_size_train, cfg.data.max_size, cfg.data.hflip, False)
    batch = collate([td[(i, 0)] for i in range(3)])
    protos = []
    for on_host in (True, False):
        monkeypatch.setattr(sim_method, "select_pixels_on_host", lambda device, v=on_host: v)
        torch.manual_seed(0)
        model = build_model(cfg, len(ds.cat_ids)).train()
        sim = SIM(cfg, model, len(ds.cat_ids))
        sim.cfg.sim.fg_thresh = 0.3  # an untrained teacher: let some pixels through
        _, aux = model(batch, return_aux=True)
        sim.cfg.sim.proto_pixels = "mi"
        before = sim.prototypes.protos.clone()
        sim.losses(batch, aux, pseudo_on=True)
        protos.append(sim.prototypes.protos)
    assert not torch.equal(protos[0], before)  # pixels were selected and prototypes moved
    assert torch.allclose(protos[0], protos[1], atol=1e-6)
