"""benchmarks/step_time.py names a method at a model capacity as VARIANT@CAPACITY."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_variant_at_capacity_adds_the_capacity_keys():
    from capacity import CAPACITIES
    from step_time import variant

    assert variant("boxinst") == ("boxinst", [])
    method, keys = variant("sim-on@wide256")
    assert method == "sim" and keys == ["sim.warmup_frac=0.0", *CAPACITIES["wide256"]]
    with pytest.raises(SystemExit, match="unknown method 'sim-on@huge'"):
        variant("sim-on@huge")
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        variant("nope")
