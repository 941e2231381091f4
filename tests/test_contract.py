"""The contract every installed plugin passes (built-ins, the example package, anything else installed).

The contract itself ships in the testing kit (``resinspect.testing.check_contract``) so third-party
packages run the very same checks: for each plugin and model (resnet20, plain20, torchvision resnet18) on
a tiny dataset, the run gives the same results twice with the same seed, leaves no hooks and the networks
in eval mode (also with a twin), writes TensorBoard tags only under its own name, returns a section with an
explanation, and fails cleanly when it raises.
"""

import pytest

from resinspect.plugins import discover_entry_points
from resinspect.testing import check_contract

INSTALLED = sorted(name for name, info in discover_entry_points().items() if info.load_error is None)
# smaller workloads for the expensive analyses; the contract is about behaviour, not statistics
FAST = {
    "ablation": {"k_max": 2, "subsets": 2, "bn_batches": 1, "pair_blocks": 3},
    "attribution": {"images": 6, "ig_steps": 4, "smoothgrad_samples": 2, "sanity_images": 3,
                    "methods": ["saliency", "integrated_gradients", "occlusion", "gradcam"]},
    "activations": {"samples": 32},
    "paths": {"samples": 16},
    "shattered": {"lines": 1, "points": 8, "toy_seeds": 1},
    "landscape": {"resolution": 3, "resolution_1d": 3, "samples": 16},
    "curvature": {"samples": 16, "probes": 2, "top_k": 1, "max_iter": 4},
    "similarity": {"images": 32},
    "lens": {"samples": 32, "fit_samples": 16, "steps": 3},
    "rank": {"samples": 8},
}


def test_the_builtins_are_installed():
    assert {"summary", "activations", "formulas", "gradflow", "weights", "ablation", "attribution"} <= set(INSTALLED)


@pytest.mark.parametrize("plugin", INSTALLED)
def test_plugin_contract(plugin):
    check_contract(plugin, options={plugin: FAST[plugin]} if plugin in FAST else None)


@pytest.mark.parametrize("plugin", INSTALLED)
def test_plugin_contract_on_a_transformer(plugin):
    """The same contract on a small ViT: token streams, two residual sites (attention, MLP) per layer. A plugin
    that cannot apply says so with a skipped section instead of failing."""
    check_contract(plugin, models=("vit-tiny-2",), options={plugin: FAST[plugin]} if plugin in FAST else None)


def test_the_contract_catches_a_plugin_that_leaves_a_hook(tmp_path):
    """The contract can fail: a plugin that forgets to remove its hook is caught."""
    import sys
    import types

    import resinspect

    import importlib.machinery

    module = types.ModuleType("leaky_plugin")
    module.__spec__ = importlib.machinery.ModuleSpec("leaky_plugin", None)

    @resinspect.hookimpl
    def resinspect_analyze(ctx):
        ctx.model.register_forward_hook(lambda *a: None)
        return resinspect.Section("Leaky", explanation="Leaves a hook behind.")

    module.resinspect_analyze = resinspect_analyze
    sys.modules["leaky_plugin"] = module
    try:
        with pytest.raises(AssertionError, match="left on the model"):
            check_contract("leaky_plugin", models=("resnet20",))
    finally:
        sys.modules.pop("leaky_plugin", None)


@pytest.mark.parametrize("plugin", INSTALLED)
def test_plugin_contract_on_a_language_model(plugin):
    """The same contract on a small GPT trained for next-token prediction (token ids in, (B, T, V) logits out):
    every plugin runs or says in a skipped section why it cannot apply."""
    from resinspect.data.tokens import load_induction

    data = load_induction(vocab=16, length=12, train=64, test=32)
    check_contract(plugin, models=("gpt-tiny-2",), options={plugin: FAST[plugin]} if plugin in FAST else None,
                   data=data)
