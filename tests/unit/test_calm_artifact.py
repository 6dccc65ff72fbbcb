"""calm memory checks in the API process: memory.json's scalars and connections of their exact JSON types, and the
composition file's connection count, names, shapes and dtypes from its header, before any worker builds anything."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from memories.artifact import ArtifactError
from memories.calm.composition import COMPOSITION_FILE, Composition, CompositionSpec
from memories.kinds import check_any_compatible, read_any_card
from tests.tiny_models import build_calm, build_llama


@pytest.fixture(scope="module")
def calm(tiny, base_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("calm-artifact")
    return build_calm(root / "cal", tiny["base"], build_llama(root / "aug", base_tok, layers=2, seed=41), [(0, 0), (1, 1)], heads=2)


def refused(path, base_tok, base_config) -> ArtifactError:
    with pytest.raises(ArtifactError) as e:
        check_any_compatible(read_any_card(path, "m"), base_tok, base_config, None)
    assert e.value.memory == "m"
    return e.value


def with_card(calm, out, **changes):
    d = shutil.copytree(calm, out)
    card = json.loads((d / "memory.json").read_text())
    (d / "memory.json").write_text(json.dumps({**card, **changes}))
    return d


def with_composition(calm, out, edit):
    d = shutil.copytree(calm, out)
    weights = load_file(str(d / COMPOSITION_FILE))
    edit(weights)
    save_file(weights, str(d / COMPOSITION_FILE))
    return d


def test_a_good_calm_memory_passes(calm, base_tok, base_config):
    card = read_any_card(calm, "m")
    check_any_compatible(card, base_tok, base_config, None)
    assert card.connections == ((0, 0), (1, 1))


@pytest.mark.parametrize("eps", ["nan", float("nan"), float("inf"), None, True])
def test_rms_eps_must_be_a_finite_number(calm, tmp_path, base_tok, base_config, eps):
    e = refused(with_card(calm, tmp_path / "e", rms_eps=eps), base_tok, base_config)
    assert e.check == "memory.json rms_eps is not a finite number" and e.detail == repr(eps)


@pytest.mark.parametrize("eps", [-1.0, 0, 1.0])
def test_rms_eps_must_be_small_and_positive(calm, tmp_path, base_tok, base_config, eps):
    e = refused(with_card(calm, tmp_path / "e", rms_eps=eps), base_tok, base_config)
    assert e.check == "memory.json rms_eps out of range" and f"{eps:g} not in (0, 0.1]" == e.detail


def test_connection_count_must_be_the_compositions(calm, tmp_path, base_tok, base_config, monkeypatch):
    many = with_card(calm, tmp_path / "many", connections=[[0, 0]] * 3000)
    monkeypatch.setattr(Composition, "__init__", lambda *a: pytest.fail("a composition was built before its count was checked"))
    e = refused(many, base_tok, base_config)
    assert e.check == "connection count differs from the composition"
    assert e.detail == f"memory.json has 3000 connections, {COMPOSITION_FILE} has 2"
    spec = CompositionSpec(((0, 0),) * 3000, 128, 128, 2)
    with pytest.raises(ArtifactError, match="memory.json has 3000 connections"):  # the worker's load checks it first too
        Composition.load(calm / COMPOSITION_FILE, spec, "m")


@pytest.mark.parametrize("connections", [[[0.0, 0], [1, 1]], [[True, 0], [1, 1]], [["0", 0], [1, 1]], [[0, 0, 0], [1, 1]]])
def test_connections_are_pairs_of_integers(calm, tmp_path, base_tok, base_config, connections):
    e = refused(with_card(calm, tmp_path / "c", connections=connections), base_tok, base_config)
    assert e.check == "memory.json connections malformed" and e.detail.startswith(f"connection 0 is {connections[0]!r}")


@pytest.mark.parametrize("heads", [2.0, "2", True])
def test_widths_and_heads_are_integers(calm, tmp_path, base_tok, base_config, heads):
    e = refused(with_card(calm, tmp_path / "h", heads=heads), base_tok, base_config)
    assert e.check == "memory.json calm fields missing or malformed" and f"heads is {heads!r}" in e.detail


def test_a_composition_tensor_of_the_wrong_shape_is_refused_from_the_header(calm, tmp_path, base_tok, base_config):
    def shrink(w):
        w["connections.1.q.weight"] = w["connections.1.q.weight"][:, :64].contiguous()

    e = refused(with_composition(calm, tmp_path / "s", shrink), base_tok, base_config)
    assert e.check == "composition does not match memory.json" and "connections.1.q.weight has shape (128, 64)" in e.detail and "(128, 128)" in e.detail


def test_integer_composition_tensors_are_refused_for_their_dtype(calm, tmp_path, base_tok, base_config):
    def quantize(w):
        w["connections.0.k.weight"] = w["connections.0.k.weight"].round().to(torch.int8)

    d = with_composition(calm, tmp_path / "i", quantize)
    e = refused(d, base_tok, base_config)
    assert e.check == "unsupported dtype" and "connections.0.k.weight is I8" in e.detail and "floating point" in e.detail
    with pytest.raises(ArtifactError, match=r"unsupported dtype: connections\.0\.k\.weight is torch\.int8"):  # the worker says the same
        Composition.load(d / COMPOSITION_FILE, CompositionSpec(((0, 0), (1, 1)), 128, 128, 2), "m")
