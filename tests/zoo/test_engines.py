"""Engines and precisions (issue #15): declared in the registry, verified against fp32, chosen by auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_zoo
from zoo.engines.common import cpu_flags
from zoo.engines.select import engine_unavailable
from zoo.errors import ProviderError, RegistryError
from zoo.registry import load_registry
from zoo.verify import check_precision, select_engine

OPENVINO = engine_unavailable("openvino")
TORCH = engine_unavailable("torch")
ENGINES = [
    "onnxruntime",
    pytest.param("openvino", marks=pytest.mark.skipif(OPENVINO is not None, reason=str(OPENVINO))),
    pytest.param("torch", marks=pytest.mark.skipif(TORCH is not None, reason=str(TORCH))),
]


SHA = "a" * 64  # a well-formed sha256 (the file is never reached)


def _entry_yaml(path: Path, extra: str) -> Path:
    text = path.read_text().replace("    licence: MIT", extra + "    licence: MIT", 1)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("    precisions: {bf16: {engines: [openvino], min_dice: 0.999, max_abs_diff: 0.1}}\n", "must include fp32"),
        ("    precisions: {fp32: {}, int8: {}}\n", "int8 needs weights: a quantised copy"),
        (f"    precisions: {{fp32: {{weights: {{uri: d.onnx, sha256: {SHA}}}, made_by: x}}}}\n", "remove its weights"),
        (f"    precisions: {{fp32: {{}}, int8: {{weights: {{uri: d.onnx, sha256: {SHA}}}}}}}\n", "need made_by"),
        ("    precisions: {fp32: {}, bf16: {engines: [openvino]}}\n", "need a bundled test"),
        ("    precisions: {fp32: {engines: [tensorflow]}}\n", "precisions"),
        ("    precisions: {fp32: {}, bf16: {engines: [openvino], min_dice: 0.9}}\n", "add a reason"),
    ],
)
def test_registry_refuses_bad_precisions(extra: str, needle: str, darkness_registry: Path) -> None:
    _entry_yaml(darkness_registry, extra)
    with pytest.raises(RegistryError, match=needle):
        load_registry(darkness_registry)


def test_verify_reports_every_engine_and_precision() -> None:
    r = run_zoo("verify", "tissue-multires", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {(c["engine"], c["precision"]): c for c in json.loads(r.stdout)[0]["checks"]}
    assert set(checks) == {
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("openvino", "fp16"),
        ("torch", "fp32"),
        ("torch", "bf16"),
        ("torch", "fp16"),
    }
    for c in checks.values():
        assert c["ok"] or c.get("skipped"), c  # a check either passes or says why it could not run here
    if "avx512_fp16" not in cpu_flags() and "amx_fp16" not in cpu_flags():
        assert "no fp16 arithmetic" in checks[("openvino", "fp16")]["skipped"]


@pytest.mark.parametrize("engine", ENGINES)
def test_fp32_is_the_same_on_every_engine(engine: str) -> None:
    """OpenVINO would silently use bf16 on this CPU if the precision were not set: fp32 must be fp32."""
    reg = load_registry()
    res = check_precision(reg.get("tissue-multires"), reg, engine, "fp32")
    assert res["ok"] and res["max_abs_diff"] < 1e-4 and res["dice"] == 1.0


def test_auto_picks_the_fastest_passing_combination() -> None:
    reg = load_registry()
    entry = reg.get("tissue-multires")
    choice = select_engine(entry, reg)
    bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if OPENVINO is None and bf16:
        assert (choice.engine, choice.precision) == ("openvino", "bf16")
    else:
        assert (choice.engine, choice.precision) == ("onnxruntime", "fp32")
    assert select_engine(entry, reg, gpu={"onnxruntime"}).precision == "fp32"  # ONNX Runtime's CUDA provider: fp32
    peer = reg.get("peer-tissue-unet")  # bf16 measured below its tolerance: not allowed, never chosen
    assert select_engine(peer, reg).precision == "fp32"
    with pytest.raises(ProviderError, match="not allowed by its registry entry"):
        select_engine(entry, reg, "onnxruntime", "bf16")


@pytest.mark.skipif(OPENVINO is not None, reason=str(OPENVINO))
def test_a_stated_label_agreement_is_enforced() -> None:
    """A model whose bf16 threshold is stated per entry (with its reason) passes at it and fails above what bf16
    reproduces: the share of label pixels equal to fp32's is checked, not only the per-class Dice."""
    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 arithmetic")
    reg = load_registry()
    entry = reg.get("colon-neoplasia@1.0.0")
    spec = entry.precisions["bf16"]
    assert spec.reason and spec.min_agreement >= 0.999
    res = check_precision(entry, reg, "openvino", "bf16")
    assert res["ok"] and spec.min_agreement <= res["agreement"] < 1.0, res
    strict = entry.model_copy(
        update={"precisions": {**entry.precisions, "bf16": spec.model_copy(update={"min_agreement": 1.0})}}
    )
    res = check_precision(strict, reg, "openvino", "bf16")
    assert not res["ok"] and "labels as fp32" in res["detail"], res


VNNI = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
INT8_ENGINES = [
    pytest.param("onnxruntime", marks=pytest.mark.skipif(not VNNI, reason="this CPU has no int8 arithmetic (VNNI)")),
    pytest.param(
        "openvino", marks=pytest.mark.skipif(OPENVINO is not None or not VNNI, reason=str(OPENVINO or "no VNNI"))
    ),
]


@pytest.mark.parametrize("engine", INT8_ENGINES)
def test_int8_runs_its_own_pinned_file_and_meets_its_threshold(engine: str) -> None:
    """int8 runs the entry's quantised copy (not the fp32 file at a lower hint), checked against fp32's output."""
    reg = load_registry()
    entry = reg.get("tumour-tiles@1.2.0")
    w = entry.weights_for("int8")
    assert w.uri.endswith("-int8.onnx") and w.sha256 != entry.weights.sha256
    assert entry.weights_for("bf16") is entry.weights  # other precisions run the fp32 file
    res = check_precision(entry, reg, engine, "int8")
    assert res["ok"] and res["agreement"] >= entry.precisions["int8"].min_agreement, res
    assert 0 < res["max_abs_diff"] <= entry.precisions["int8"].max_abs_diff  # really another network, within bounds


def test_int8_is_refused_where_it_cannot_run() -> None:
    assert "not on a GPU" in str(engine_unavailable("onnxruntime", "int8", device=0))
    assert "not fp16" in str(engine_unavailable("onnxruntime", "fp16"))
    reg = load_registry()
    with pytest.raises(ProviderError, match="not allowed by its registry entry"):
        select_engine(reg.get("tissue-multires"), reg, "auto", "int8")  # no quantised copy registered


@pytest.mark.skipif(OPENVINO is not None or not VNNI, reason=str(OPENVINO or "this CPU has no VNNI"))
def test_run_with_int8_records_the_quantised_file(lymph_node_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run_zoo("run", "tumour-tiles@1.2.0", str(lymph_node_slide), "--out", str(out), "--format", "tiff")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / lymph_node_slide.stem / "run.json").read_text())
    entry = load_registry().get("tumour-tiles@1.2.0")
    assert (run["engine"]["engine"], run["engine"]["precision"]) == ("openvino", "int8")  # auto: the fastest here
    assert run["model"]["files"][0]["sha256"] == entry.weights_for("int8").sha256
    assert run["model"]["files"][0]["path"].endswith("tumour-tiles-int8.onnx")
    assert run["request"]["converted_sha256"] == {"main/int8": entry.weights_for("int8").sha256}


def test_a_tampered_int8_file_stops_the_run_before_any_output(cmu_slide: Path, tmp_path: Path) -> None:
    """Every precision's pinned file is checked before a run starts, even one auto might not pick."""
    import shutil

    from zoo.registry import load_registry as load

    reg = load()
    dst = tmp_path / "reg"
    (dst / "models/tumour-tiles").mkdir(parents=True)
    shutil.copytree(reg.root / "models/tumour-tiles/1.2.0", dst / "models/tumour-tiles/1.2.0")
    shutil.copy(reg.root / "registry.yaml", dst / "registry.yaml")
    q = dst / load(dst / "registry.yaml").get("tumour-tiles@1.2.0").weights_for("int8").uri
    data = bytearray(q.read_bytes())
    data[len(data) // 2] ^= 0xFF
    q.write_bytes(bytes(data))
    out = tmp_path / "o"
    reg_file = str(dst / "registry.yaml")
    r = run_zoo("--registry", reg_file, "run", "tumour-tiles@1.2.0", str(cmu_slide), "--out", str(out))
    assert r.returncode == 1 and "precisions.int8.weights.uri" in r.stderr and "sha256" in r.stderr, r.stderr
    assert not out.exists() or not any(out.rglob("*")), "no partial output"


def test_run_records_engine_and_precision(cmu_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run_zoo("run", "tissue-multires", str(cmu_slide), "--out", str(out), "--engine", "onnxruntime")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / cmu_slide.stem / "run.json").read_text())
    assert run["engine"]["engine"] == "onnxruntime" and run["engine"]["precision"] == "fp32"
    assert run["request"]["engine"] == "onnxruntime" and "[onnxruntime fp32]" in r.stdout


@pytest.mark.skipif(OPENVINO is not None, reason=str(OPENVINO))
def test_bf16_mask_agrees_with_fp32_on_a_real_slide(tcga_slide: Path, tmp_path: Path) -> None:
    import tifffile

    from bridge.edits import dice

    if not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 arithmetic")
    masks = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = ["--engine", "openvino" if precision == "bf16" else "onnxruntime", "--precision", precision]
        r = run_zoo("run", "tissue-multires", str(tcga_slide), "--out", str(out), *args)
        assert r.returncode == 0, r.stderr
        masks[precision] = tifffile.imread(out / tcga_slide.stem / "mask.tiff")
    assert dice(masks["bf16"] == 1, masks["fp32"] == 1) >= 0.999
    assert np.mean(masks["bf16"] != masks["fp32"]) < 0.002


@pytest.mark.skipif(TORCH is not None, reason=str(TORCH))
def test_torch_engine_runs_every_registered_network_like_onnxruntime() -> None:
    """The ONNX graphs run by torch ops (zoo.engines.torch_graph) reproduce ONNX Runtime on every bundled test."""
    reg = load_registry()
    for entry in reg.models:
        for _, view in entry.networks():
            if view.test is None:
                continue
            res = check_precision(view, reg, "torch", "fp32")
            assert res["ok"] and res["max_abs_diff"] <= view.precisions["fp32"].max_abs_diff, (view.id, res)


@pytest.mark.skipif(TORCH is not None, reason=str(TORCH))
@pytest.mark.parametrize("model", ["tissue-multires", "peer-tissue-unet", "tumour-tiles"])
def test_torch_engine_normalises_uint8_tiles_on_the_device_as_the_host_does(model: str) -> None:
    """uint8 tiles go to the torch engine as they are and are normalised there (NCHW and NHWC networks): the
    same raw output, bit for bit, as the host's float32 normalisation; float input still runs as it is."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights

    reg = load_registry()
    entry = reg.get(model)
    m = OnnxModel(verified_weights(entry, reg), entry, engine="torch", threads=1)
    assert m.uint8_input and "normalised on the device" in m.providers[0]
    w, h = entry.input.patch_size_px
    tiles = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    x = m.preprocess(tiles)
    assert x.dtype == np.uint8  # handed over as it is
    np.testing.assert_array_equal(m.raw(x), m.raw(m._normalise(tiles)))


@pytest.mark.skipif(TORCH is not None, reason=str(TORCH))
def test_torch_engine_refuses_an_op_it_does_not_run(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from zoo.engines.torch_graph import load_graph
    from zoo.errors import ModelInputError

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Erf", ["image"], ["out"])], "g", [x], [y])
    path = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ModelInputError, match="does not run ONNX ops Erf"):
        load_graph(str(path), str(path))


@pytest.mark.skipif(TORCH is not None, reason=str(TORCH))
@pytest.mark.parametrize("readers", [1, 3])
def test_torch_engine_and_reader_threads_give_the_onnxruntime_mask(readers: int, cmu_slide: Path) -> None:
    """Several reader threads decode in parallel, but batches are blended in order: the same mask."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights
    from zoo.runner import RunOptions, predict_slide
    from zoo.slide import open_slide

    reg = load_registry()
    entry = reg.get("tissue-multires")
    path = verified_weights(entry, reg)
    masks = {}
    for engine, n in (("onnxruntime", 1), ("torch", readers)):
        with open_slide(cmu_slide) as s:
            pred = predict_slide(
                s, OnnxModel(path, entry, engine=engine), RunOptions(batch_size=3, reader_threads=n, progress=False)
            )
            masks[engine] = pred.mask.to_array()
            pred.close()
    assert np.mean(masks["torch"] != masks["onnxruntime"]) < 1e-4


@pytest.mark.skipif(OPENVINO is not None, reason=str(OPENVINO))
@pytest.mark.parametrize("n_tiles", [1, 3, 8, 11], ids=["one", "padded", "exact", "split"])
def test_openvino_takes_uint8_tiles_and_any_batch_like_onnxruntime(n_tiles: int) -> None:
    """OpenVINO: static batch of 4 (shorter padded, longer split), uint8 tiles normalised inside the engine."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights

    reg = load_registry()
    entry = reg.get("tissue-multires")
    path = verified_weights(entry, reg)
    ov = OnnxModel(path, entry, engine="openvino", precision="fp32", batch_size=4)
    ref = OnnxModel(path, entry)
    assert ov.uint8_input and ov.fixed_batch == 4 and "static batch 4" in ov.providers[0]
    tiles = np.random.default_rng(n_tiles).integers(0, 256, (n_tiles, 256, 256, 3), dtype=np.uint8)
    x = ov.preprocess(tiles)
    assert x.dtype == np.uint8 and x.shape == tiles.shape  # handed over as they are
    want = ref.predict(ref.preprocess(tiles))
    np.testing.assert_allclose(ov.predict(x), want, rtol=0, atol=1e-4)
    # network-format float input made from uint8 tiles goes the same way; other float input is run as it is
    np.testing.assert_allclose(ov.predict(ref.preprocess(tiles)), want, rtol=0, atol=1e-4)
    off_grid = ref.preprocess(tiles) + np.float32(0.001)
    np.testing.assert_allclose(ov.predict(off_grid), ref.predict(off_grid), rtol=0, atol=1e-4)


@pytest.mark.skipif(TORCH is not None, reason=str(TORCH))
@pytest.mark.parametrize(("starts", "ends", "steps"), [([-1], [-(2**31)], [-1]), ([5], [0], [-2]), ([6], [-9], [-3])])
def test_torch_engine_backward_slices_match_onnxruntime_and_survive_re_export(
    tmp_path: Path, starts: list[int], ends: list[int], steps: list[int]
) -> None:
    """Flips (negative Slice steps, as in rotation TTA) traced to TorchScript and exported again stay exact.

    The first version indexed with a traced ``arange``; ONNX Runtime read that re-export wrongly (WSInfer round trip).
    """
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from zoo.engines.torch_graph import load_graph

    named = ((starts, "s"), (ends, "e"), ([3], "a"), (steps, "t"))
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in named]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 2, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    node = helper.make_node("Slice", ["image", "s", "e", "a", "t"], ["out"])
    graph = helper.make_graph([node], "g", [x], [y], consts)
    path = tmp_path / "slice.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = np.random.default_rng(0).random((3, 2, 8, 8), dtype=np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": data})[0]
    graph_module = load_graph(str(path), str(path))

    class First(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return graph_module(t)[0]

    module = First()
    with torch.no_grad():
        np.testing.assert_array_equal(module(torch.from_numpy(data)).numpy(), want)
        traced = torch.jit.trace(module, torch.from_numpy(data[:2]))
        again = tmp_path / "again.onnx"
        torch.onnx.export(traced, (torch.from_numpy(data[:2]),), str(again), input_names=["image"],
                          dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)  # fmt: skip
    back = ort.InferenceSession(str(again), providers=["CPUExecutionProvider"]).run(None, {"image": data})[0]
    np.testing.assert_array_equal(back, want)


@pytest.mark.parametrize(("model", "arena"), [("peer-tissue-unet", False), ("tissue-multires", True)])
def test_onnxruntime_arena_only_for_networks_that_run_many_times(model: str, arena: bool) -> None:
    """A whole-slide network runs once per slide: no arena keeping its peak (tumour-h2g's refinement: 873 vs
    1,576 MB, benchmarks/bench_whole_slide_memory.py); tiled networks keep it for reuse between batches."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights

    reg = load_registry()
    entry = reg.get(model)
    m = OnnxModel(verified_weights(entry, reg), entry, providers=["CPUExecutionProvider"])
    assert m.runner.session.get_session_options().enable_cpu_mem_arena is arena


#: the remembered engine checks' files (beside them: ``graph-*`` and ``openvino-*``)
CHECKS = "[0-9a-f]*.json"


@pytest.mark.skipif(OPENVINO is not None, reason=str(OPENVINO))
def test_openvino_remembers_its_group_norm_rewrite_by_the_files_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewritten graph is kept with its sha256: a later load reads it without onnx and computes the same;
    a changed copy is rewritten afresh; a network with nothing to rewrite is read from its own file."""
    import onnx

    from zoo.engines.model import OnnxModel
    from zoo.errors import ModelInputError
    from zoo.registry import verified_weights

    monkeypatch.setenv("ZOO_CHECK_CACHE", "1")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    reg = load_registry()
    entry = reg.get("tissue-multires")
    path = verified_weights(entry, reg)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)

    def load(reason: str) -> tuple[str, np.ndarray]:
        m = OnnxModel(path, entry, engine="openvino", precision="fp32", batch_size=2)
        return m.providers[0], m.raw(m.preprocess(tiles))

    first, want = load("first")
    assert "24 GroupNorms channels-last" in first
    (rewritten,) = (tmp_path / "checks").glob("openvino-*.onnx")
    real_load = onnx.load

    def no_onnx(*_: object, **__: object) -> None:
        raise AssertionError("onnx was asked to read the network again")

    monkeypatch.setattr(onnx, "load", no_onnx)
    again, got = load("remembered")
    assert again == first
    np.testing.assert_array_equal(got, want)
    rewritten.write_bytes(b"changed")
    with pytest.raises(ModelInputError, match="read the network again"):
        load("changed copy")
    monkeypatch.setattr(onnx, "load", real_load)
    _, got = load("rewritten afresh")
    np.testing.assert_array_equal(got, want)
    plain = reg.get("tumour-tiles@1.2.0")
    OnnxModel(verified_weights(plain, reg), plain, engine="openvino", precision="fp32")
    monkeypatch.setattr(onnx, "load", no_onnx)
    m = OnnxModel(verified_weights(plain, reg), plain, engine="openvino", precision="fp32")  # its own file
    assert "GroupNorms" not in m.providers[0]
    assert len(list((tmp_path / "checks").glob("openvino-*.onnx"))) == 1


@pytest.mark.skipif(OPENVINO is not None, reason=str(OPENVINO))
def test_a_run_remembers_passed_checks_only_for_the_same_files_engine_and_tolerances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run reuses an earlier passing check (the same file, test, engine version, tolerances and CPU); a
    failure is never remembered; ``zoo verify``'s check_precision always runs afresh."""
    import zoo.verify as verify

    monkeypatch.setenv("ZOO_CHECK_CACHE", "1")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(verify, "_CHECKED", {})
    monkeypatch.setattr(verify, "_REMEMBERED", {})
    reg = load_registry()
    entry = reg.get("tumour-tiles@1.2.0")
    first = verify.remembered_check(entry, reg, "openvino", "fp32")
    assert first["ok"] and "remembered" not in first
    assert len(list((tmp_path / "checks").glob(CHECKS))) == 1
    verify._CHECKED.clear()
    again = verify.remembered_check(entry, reg, "openvino", "fp32")
    assert again["remembered"] and again["max_abs_diff"] == first["max_abs_diff"] and "checked 20" in again["detail"]
    (kept,) = (tmp_path / "checks").glob(CHECKS)
    kept.rename(tmp_path / "aside.json")
    assert verify.remembered_check(entry, reg, "openvino", "fp32") is again  # the next slide: from memory, no I/O
    (tmp_path / "aside.json").rename(kept)
    assert "remembered" not in verify.check_precision(entry, reg, "openvino", "fp32")  # zoo verify: fresh
    spec = entry.precisions["fp32"].model_copy(update={"max_abs_diff": 1e-12})  # OpenVINO differs by ~1e-7
    strict = entry.model_copy(update={"precisions": {**entry.precisions, "fp32": spec}})
    failed = verify.remembered_check(strict, reg, "openvino", "fp32")
    assert not failed["ok"] and "remembered" not in failed
    assert len(list((tmp_path / "checks").glob(CHECKS))) == 1  # other tolerances: another key; failures: none
    monkeypatch.setenv("ZOO_CHECK_CACHE", "0")
    verify._CHECKED.clear()
    verify._REMEMBERED.clear()
    assert "remembered" not in verify.remembered_check(entry, reg, "openvino", "fp32")
