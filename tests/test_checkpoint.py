"""The checkpoint helpers that need no training run: the index never naming a diverged (non-finite) best,
RNG state round trip."""

import json
import random

import pytest
import torch

from t5dialog import checkpoint as ckpt


def strict_json(path):
    """Parse as strict JSON readers do: a bare NaN or Infinity is an error."""
    def refuse(token):
        raise ValueError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- index and RNG state


def make_checkpoints(out, *steps):
    for step in steps:
        (out / f"{ckpt.PREFIX}{step:08d}").mkdir(parents=True)
    return ckpt.list_checkpoints(out)


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_the_index_never_records_a_non_finite_best(tmp_path, loss):
    first, second, latest = make_checkpoints(tmp_path, 1, 2, 3)
    ckpt.update_index_and_prune(tmp_path, latest, first, loss, keep=1)
    index = strict_json(tmp_path / ckpt.INDEX)
    assert index == {"latest": latest.name, "best": None, "best_val_loss": None}
    assert ckpt.list_checkpoints(tmp_path) == [latest]  # a diverged "best" is not worth keeping


def test_the_index_keeps_a_finite_best(tmp_path):
    first, second, latest = make_checkpoints(tmp_path, 1, 2, 3)
    ckpt.update_index_and_prune(tmp_path, latest, first, 2.5, keep=1)
    assert strict_json(tmp_path / ckpt.INDEX) == {"latest": latest.name, "best": first.name, "best_val_loss": 2.5}
    assert ckpt.list_checkpoints(tmp_path) == [first, latest]


def test_rng_state_survives_a_save_and_a_safe_load(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    ckpt.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
