"""krflows.save / krflows.load (config + weights, safe loading); Lightning checkpoints of injected flows."""

import warnings

import lightning as L
import pytest
import torch
from conftest import FAMILY_NAMES, make_flow, randomized

import krflows
from krflows.io import FORMAT_VERSION, flow_config
from krflows.lightning import KRFlowModule
from krflows.transforms import Affine, Spline


def round_trip(flow, tmp_path):
    path = tmp_path / "flow.pt"
    krflows.save(flow, path)
    return krflows.load(path)


def assert_same_flow(a, b, configs=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    torch.manual_seed(7)
    xa = a.sample((16,))
    torch.manual_seed(7)
    xb = b.sample((16,))
    assert torch.equal(xa, xb)  # same seed, same draws
    assert torch.equal(a.log_prob(xa), b.log_prob(xa))
    assert not configs or flow_config(a) == flow_config(b)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_round_trip_of_each_family_in_float64_with_an_order(family, tmp_path):
    flow = make_flow(family, 3, order=[2, 0, 1])
    loaded = round_trip(flow, tmp_path)
    assert loaded.base.mean.dtype == torch.float64 and loaded.order.tolist() == [2, 0, 1]
    assert_same_flow(flow, loaded)


@pytest.mark.parametrize("make", [
    lambda: krflows.KRFlow(2, layers=1, hidden=(8, 4)),  # float32 default
    lambda: krflows.KRFlow(3, family="bernstein", layers=2, hidden=(6,), degree=5, bound=4.0),
    lambda: krflows.KRFlow(2, family=Spline(bins=4, affine=False), layers=1, hidden=(8,)),
    lambda: krflows.KRFlow(2, family="affine", layers=0, affine_stage=True),
    lambda: krflows.KRFlow(2, layers=1, hidden=(8,), affine_stage=False),
])
def test_round_trip_of_options(make, tmp_path):
    flow = randomized(make(), std=0.2)
    loaded = round_trip(flow, tmp_path)
    assert_same_flow(flow, loaded)
    assert repr(loaded.family) == repr(flow.family)


def test_file_loads_under_weights_only_and_records_versions(tmp_path):
    flow = make_flow("spline", 2)
    krflows.save(flow, tmp_path / "f.pt")
    payload = torch.load(tmp_path / "f.pt", weights_only=True)
    assert payload["format"] == "krflows.KRFlow" and payload["format_version"] == FORMAT_VERSION
    assert payload["krflows_version"] == krflows.__version__
    assert payload["torch_version"] == str(torch.__version__)
    assert payload["config"] == flow_config(flow) and payload["config"]["dtype"] == "float64"


def test_compiled_flow_is_compiled_again_with_its_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append(options) or fn)
    flow = randomized(krflows.KRFlow(2, layers=1, hidden=(4,), compile=True), std=0.2)
    flow.compile(dynamic=False)
    loaded = round_trip(flow, tmp_path)
    assert set(loaded._compiled) == {"push", "pull"} and calls[-1] == {"dynamic": False}
    assert flow_config(loaded)["compile"] == {"dynamic": False}
    assert_same_flow(flow, loaded)


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    krflows.save(make_flow("spline", 2), good)
    data = good.read_bytes()
    cases = {
        "garbage.pt": b"this is not a torch file",
        "truncated.pt": data[: len(data) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    torch.save(make_flow("spline", 2), tmp_path / "pickled_module.pt")  # not loadable safely
    for name in [*cases, "foreign.pt", "pickled_module.pt"]:
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"^not a krflows flow file: {path}: ") as err:
            krflows.load(path)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such flow file"):
        krflows.load(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is a directory, not a flow file"):
        krflows.load(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_valid_file_mapped_to_a_missing_device_is_not_called_corrupt(tmp_path):
    krflows.save(make_flow("spline", 2), tmp_path / "f.pt")
    with pytest.raises(ValueError, match="^cannot load .* onto map_location='cuda': .*CUDA"):
        krflows.load(tmp_path / "f.pt", map_location="cuda")


def test_bad_weights_and_config_are_refused(tmp_path):
    krflows.save(make_flow("spline", 2), tmp_path / "f.pt")
    payload = torch.load(tmp_path / "f.pt", weights_only=True)
    payload["config"]["hidden"] = [5]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a krflows flow file: .*bad configuration or weights") as err:
        krflows.load(tmp_path / "bad.pt")
    assert "size mismatch for" in str(err.value) and "\n" not in str(err.value)  # which weights, one line


def test_a_newer_format_is_refused_with_both_versions(tmp_path):
    krflows.save(make_flow("spline", 2), tmp_path / "f.pt")
    payload = torch.load(tmp_path / "f.pt", weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=rf"format {FORMAT_VERSION + 1} .* reads format {FORMAT_VERSION} "
                                         r"and older: upgrade krflows"):
        krflows.load(tmp_path / "new.pt")


class MyFamily(Affine):
    pass


class MyFlow(krflows.KRFlow):
    pass


def test_custom_family_and_subclass_are_refused_on_saving(tmp_path):
    with pytest.raises(ValueError, match="custom family MyFamily.*built-in families"):
        krflows.save(krflows.KRFlow(2, family=MyFamily(), layers=1, hidden=(4,)), tmp_path / "f.pt")
    with pytest.raises(ValueError, match="stores a krflows.KRFlow, got MyFlow"):
        krflows.save(MyFlow(2, layers=1, hidden=(4,)), tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()


# ---- Lightning checkpoints of a module with an injected flow ---------------------------------


def fit_and_checkpoint(module, tmp_path) -> str:
    torch.set_num_threads(1)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(module)
    return t.checkpoint_callback.best_model_path


def test_checkpoint_with_an_injected_flow_reloads(tmp_path):
    flow = krflows.KRFlow(2, family="bernstein", layers=1, hidden=(8,), order=[1, 0], degree=4)
    module = KRFlowModule(flow=flow, target="banana", warmup=1, batch_size=32)
    path = fit_and_checkpoint(module, tmp_path)
    loaded = KRFlowModule.load_from_checkpoint(path)
    assert flow_config(loaded.flow) == flow_config(flow)
    assert_same_flow(flow, loaded.flow)
    assert loaded._warmed_up and loaded.target.dim == 2
    # passing the flow again keeps that object and loads the weights into it
    again = krflows.KRFlow(2, family="bernstein", layers=1, hidden=(8,), order=[1, 0], degree=4)
    assert KRFlowModule.load_from_checkpoint(path, flow=again).flow is again
    assert_same_flow(flow, again)


def test_checkpoint_with_injected_target_warns_unless_passed_again(tmp_path):
    target = krflows.targets.Banana()
    module = KRFlowModule(flow=krflows.KRFlow(2, layers=1, hidden=(8,)), target=target, warmup=1,
                          batch_size=32)
    path = fit_and_checkpoint(module, tmp_path)
    with pytest.warns(UserWarning, match="injected target object.*target=..."):
        KRFlowModule.load_from_checkpoint(path)
    with pytest.warns(UserWarning, match="injected target object"):  # with the flow passed again too
        KRFlowModule.load_from_checkpoint(path, flow=krflows.KRFlow(2, layers=1, hidden=(8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = KRFlowModule.load_from_checkpoint(path, target=target)
    assert loaded.target.dim == 2
    assert_same_flow(module.flow, loaded.flow)


def test_checkpoint_with_a_custom_family_asks_for_the_flow(tmp_path):
    module = KRFlowModule(flow=krflows.KRFlow(2, family=MyFamily(), layers=1, hidden=(8,)),
                          target="banana", warmup=1, batch_size=32)
    path = fit_and_checkpoint(module, tmp_path)
    with pytest.raises(ValueError, match=r"custom family.*load_from_checkpoint\(path, flow=flow\)"):
        KRFlowModule.load_from_checkpoint(path)
    again = krflows.KRFlow(2, family=MyFamily(), layers=1, hidden=(8,))
    assert_same_flow(module.flow, KRFlowModule.load_from_checkpoint(path, flow=again).flow, configs=False)
