"""The 1-D VGG networks, their weights files, and scoring a store in torch and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from spectransfer.config import DEFAULT_GRID, Grid
from spectransfer.errors import EvaluateError, TrainError
from spectransfer.ml.models import (
    MODEL_NAMES,
    ModelConfig,
    build_model,
    count_parameters,
    forward_outputs,
    load_init_weights,
    load_run,
    read_weights,
    redshift_from_head,
    save_weights,
)
from spectransfer.ml.score import score_store
from test_dataset import make_store


def _vgg_a_parameters(n_bins: int = 2048) -> int:
    """VGG Net-A in 1-D counted by hand: (c_in*3 + 1)*c_out per conv, (in + 1)*out per dense."""
    convs = [(1, 16), (16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
    dense = [(128 * n_bins // 32, 1024), (1024, 1024), (1024, 1)]
    return sum((ci * 3 + 1) * co for ci, co in convs) + sum((i + 1) * o for i, o in dense)


def test_vgg_a_matches_the_paper_size_and_shape():
    model = build_model(ModelConfig("vgg-a", n_bins=2048))
    n = count_parameters(model)
    assert n == _vgg_a_parameters() == 9_632_993
    assert abs(n - 9.63e6) / 9.63e6 < 0.01  # the authors' Keras summary: ~9.63M
    assert model(torch.zeros(3, 1, 2048)).shape == (3,)
    assert model(torch.zeros(5, 2048)).shape == (5,)  # a channel axis is optional for 1 channel
    # 8192 = 128 channels x 64 bins after five pools, as in the paper
    assert model.head[1].in_features == 8192
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.5, 0.5]


@pytest.mark.parametrize("name,n_conv", [("vgg-a", 8), ("vgg-b", 10), ("vgg-d", 13), ("vgg-e", 16)])
def test_vgg_configurations_have_vggs_depths(name, n_conv):
    # VGG A/B/D/E have 11/13/16/19 weight layers, three of them dense
    model = build_model(ModelConfig(name, n_bins=256))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == n_conv
    assert all(c.kernel_size == (3,) and c.padding == (1,) for c in convs)
    assert sum(isinstance(m, nn.MaxPool1d) for m in model.modules()) == 5
    assert model(torch.zeros(2, 1, 256)).shape == (2,)
    assert set(MODEL_NAMES) == {"vgg-a", "vgg-b", "vgg-d", "vgg-e"}


def test_weights_are_xavier_uniform_and_biases_zero():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_bins=2048))
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            w = m.weight.detach().numpy().ravel()
            assert np.abs(w).max() <= bound
            if w.size > 10_000:  # uniform on [-b, b] has variance b^2/3
                assert w.var() == pytest.approx(bound**2 / 3, rel=0.05)
            assert not m.bias.detach().any()


def test_bad_model_configs_are_refused():
    with pytest.raises(TrainError, match="unknown model"):
        ModelConfig("resnet")
    with pytest.raises(TrainError, match="multiple of 32"):
        ModelConfig("vgg-a", n_bins=2000)
    with pytest.raises(TrainError, match="in_channels"):
        ModelConfig("vgg-a", in_channels=3)


def test_weights_file_rebuilds_the_model_with_its_metadata(tmp_path):
    grid = Grid(n_bins=256)
    model = build_model(ModelConfig("vgg-b", n_bins=256, in_channels=2)).eval()
    run = tmp_path / "run"
    save_weights(model, run / "model.safetensors", grid, mode="finetune")
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    loaded, info = load_run(run)
    assert info.model_name == "vgg-b" and info.model_config.in_channels == 2 and info.grid == grid
    assert info.mode == "finetune" and info.temperature == 1.7 and len(info.sha256) == 64
    _, meta = read_weights(run / "model.safetensors")
    assert json.loads(meta["grid"]) == grid.to_dict() and meta["spectransfer_version"]
    x = torch.randn(4, 2, 256)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(TrainError, match="not a readable safetensors"):
        load_run(tmp_path / "junk")


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("score") / "s", n=90, chunk_rows=16, grid=DEFAULT_GRID)
    torch.manual_seed(4)
    model = build_model(ModelConfig(n_bins=2048)).eval()
    return store, model


def test_score_store_torch_and_onnx_agree_with_a_direct_forward(scored_store, tmp_path):
    store, model = scored_store
    rows = np.array([70, 3, 3, 41, 89, 0, 16])  # any order, repeats allowed
    with torch.no_grad():
        want = model(torch.from_numpy(np.asarray(store.flux[:])[rows])).numpy()
    got = score_store(model, store, rows, batch_size=5)
    assert got.dtype == np.float32 and got.shape == rows.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_onnx = score_store(model, store, rows, batch_size=4, engine="onnx")
    np.testing.assert_allclose(got_onnx, want, rtol=1e-4, atol=1e-4)
    save_weights(model, tmp_path / "run" / "model.safetensors", DEFAULT_GRID, mode="scratch")
    every = score_store(tmp_path / "run", store.path, batch_size=32, num_workers=2)
    assert every.shape == (len(store.meta),)
    np.testing.assert_allclose(every[rows], want, rtol=1e-5, atol=1e-5)


def test_score_store_refuses_a_model_of_another_grid(scored_store):
    store, _ = scored_store
    with pytest.raises(EvaluateError, match="bins"):
        score_store(build_model(ModelConfig(n_bins=256)), store)
    with pytest.raises(EvaluateError, match="out of range"):
        score_store(scored_store[1], store, np.array([10_000]))


def test_z_head_branches_from_the_trunk_and_leaves_the_classifier_as_the_papers():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(n_bins=2048))
    torch.manual_seed(0)
    with_z = build_model(ModelConfig(n_bins=2048, z_bins=300)).eval()
    # trunk and classifier: the same tensors, initialised the same, the same 9.63M parameters
    own = with_z.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    extra = count_parameters(with_z) - count_parameters(plain)
    assert extra == (8192 + 1) * 256 + (256 + 1) * 300
    x = torch.randn(3, 1, 2048)
    out = forward_outputs(with_z, x)
    assert out["logit"].shape == (3,) and out["z_logits"].shape == (3, 300)
    torch.testing.assert_close(out["logit"], plain.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(with_z(x), out["logit"], rtol=0, atol=0)  # plain forward: the logit alone
    assert forward_outputs(plain, x)["z_logits"] is None


def test_a_model_file_without_z_head_metadata_loads_and_scores(tmp_path, scored_store):
    """A run saved before the z head existed: its metadata has no z_bins, its file no z tensors."""
    store, model = scored_store
    run = tmp_path / "old"
    save_weights(model, run / "model.safetensors", DEFAULT_GRID, mode="scratch")
    tensors, meta = read_weights(run / "model.safetensors")
    config = json.loads(meta["model_config"])
    for key in ("z_bins", "z_hidden"):
        config.pop(key)
    meta["model_config"] = json.dumps(config)
    from safetensors.torch import save_file

    save_file(tensors, str(run / "model.safetensors"), metadata=meta)
    loaded, info = load_run(run)
    assert not info.model_config.has_z_head and loaded.z_head is None
    rows = np.array([1, 5, 8])
    got = score_store(run, store.path, rows, batch_size=2)
    with torch.no_grad():
        want = model(torch.from_numpy(np.asarray(store.flux[:])[rows])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_with_z_head_round_trips_and_scores(tmp_path, scored_store):
    store, _ = scored_store
    torch.manual_seed(2)
    model = build_model(ModelConfig(n_bins=2048, z_bins=64)).eval()
    save_weights(model, tmp_path / "run" / "model.safetensors", DEFAULT_GRID, mode="scratch")
    loaded, info = load_run(tmp_path / "run")
    assert info.model_config.z_bins == 64
    x = torch.from_numpy(np.asarray(store.flux[:4]))
    a, b = forward_outputs(model, x), forward_outputs(loaded, x)
    torch.testing.assert_close(a["z_logits"], b["z_logits"], rtol=0, atol=0)
    z, z_err = redshift_from_head(b["z_logits"])
    assert z.shape == (4,) and np.all((z >= 0) & (z <= 7)) and np.all(z_err > 0)
    # the scorer sees the classifier's logit, as for any model
    np.testing.assert_allclose(
        score_store(loaded, store, np.arange(4), batch_size=2), a["logit"].detach().numpy(), rtol=1e-5, atol=1e-5
    )


def test_init_weights_without_z_head_keep_a_fresh_z_head():
    torch.manual_seed(0)
    old = build_model(ModelConfig(n_bins=256))
    torch.manual_seed(1)
    new = build_model(ModelConfig(n_bins=256, z_bins=32))
    before = {k: v.clone() for k, v in new.state_dict().items() if k.startswith("z_head.")}
    fresh = load_init_weights(new, old.state_dict(), "old-run")
    assert sorted(fresh) == sorted(before)
    for k, v in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0)
    for k, v in before.items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0)
    # and a z head is dropped when the new run has none
    assert load_init_weights(old, new.state_dict(), "new-run") == []
    with pytest.raises(TrainError, match="do not fit"):
        load_init_weights(build_model(ModelConfig("vgg-b", n_bins=256)), old.state_dict(), "old-run")
