"""The composed forward on transformers models, through forward hooks on both.

Training, evaluation and the serving oracle in the tests use this; serving
computes the same thing inside vLLM (``memories.calm.runtime``). The two share
only :mod:`memories.calm.composition`'s formula: each model's own forward
here is transformers', there vLLM's and memserve's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from memories.calm.composition import Composition, causal_mask


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama family: ``model.model.layers``)."""
    return model.model.layers


@contextlib.contextmanager
def composed(base, augment, composition: Composition) -> Iterator[None]:
    """While inside, ``base(input_ids)`` computes the composition with ``augment``.

    Each base call first runs ``augment`` on the same ids (without gradients:
    it is frozen) and keeps its stream after every connected layer. Rows are
    independent windows without padding; ``attention_mask`` is not supported.
    """
    spec = composition.spec
    states: dict[int, torch.Tensor] = {}
    hooks = []

    def keep(layer: int):
        def hook(module, args, output):
            states[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def before_base(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("the composed forward needs input_ids (the augmenting model reads the same tokens)")
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            raise ValueError("the composed forward does not support padding")
        states.clear()
        with torch.no_grad():
            augment(input_ids=ids)
        positions = torch.arange(ids.shape[-1], device=ids.device)
        keys_values.clear()
        for i, (a, _) in enumerate(spec.connections):
            keys_values[i] = composition.connections[i].keys_values(states[a].to(composition.connections[i].proj.weight.dtype))
        mask[0] = causal_mask(positions, ids.shape[-1])

    def add_into(layer: int):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            for i in composition.at_base_layer(layer):
                k, v = keys_values[i]
                x = x + composition.connections[i].attend(x, k, v, mask[0]).to(x.dtype)
            return (x, *output[1:]) if isinstance(output, tuple) else x

        return hook

    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    mask: list[torch.Tensor] = [torch.empty(0)]
    try:
        alayers = decoder_layers(augment)
        for a in sorted({a for a, _ in spec.connections}):
            hooks.append(alayers[a].register_forward_hook(keep(a)))
        blayers = decoder_layers(base)
        for b in sorted({b for _, b in spec.connections}):
            hooks.append(blayers[b].register_forward_hook(add_into(b)))
        hooks.append(base.register_forward_pre_hook(before_base, with_kwargs=True))
        yield
    finally:
        for h in hooks:
            h.remove()


def load_calm(path, dtype=torch.float32):
    """A calm memory's augmenting model (transformers) and composition, for evaluation and the test oracle."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from memories.artifact import MEMORY_JSON
    from memories.calm.composition import AUGMENT_DIR, COMPOSITION_FILE, CompositionSpec

    path = Path(path)
    spec = CompositionSpec.from_card(path.name, json.loads((path / MEMORY_JSON).read_text()))
    augment = AutoModelForCausalLM.from_pretrained(path / AUGMENT_DIR, dtype=dtype).eval()
    return augment, Composition.load(path / COMPOSITION_FILE, spec, path.name).to(dtype).eval()
