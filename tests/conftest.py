"""Shared fixtures: fresh tiny models of every family, and in-process test plugins."""

import pytest
import torch
from PIL import Image

import vlm_safety_plugins as vsp
from vlm_safety_plugins import plugins
from vlm_safety_plugins.testing import FAMILIES, tiny_vlm

# Tiny models run several times faster on one thread than on torch's default pool.
torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def vlm(family):
    """A fresh (model, processor) of ``family``; detached again after the test."""
    model, processor = tiny_vlm(family)
    yield model, processor
    vsp.detach(model)


@pytest.fixture
def red_image():
    return Image.new("RGB", (48, 40), (220, 30, 30))


@pytest.fixture
def register():
    """Register in-process plugins for one test: ``register(defense_cls, ...)``."""
    registered = []

    def _register(*defense_classes, report_sink=None):
        class TestPlugin:
            @vsp.hookimpl
            def register_defenses(self, register):
                for cls in defense_classes:
                    register(cls)

        plugin = TestPlugin()
        if report_sink is not None:
            plugin.safety_report = vsp.hookimpl(lambda report: report_sink.append(report))
        plugins.pm.register(plugin)
        registered.append(plugin)
        return plugin

    yield _register
    for plugin in registered:
        plugins.pm.unregister(plugin)


def batch(model, processor, requests):
    """Inputs for (text, image-or-None) requests built with the attached model's adapter."""
    attachment = vsp.get_attachment(model)
    adapter = attachment.adapter if attachment else vsp.adapters.find_adapter(model, processor)
    return adapter.build_inputs(requests)


def new_tokens(sequences, inputs):
    return sequences[:, inputs["input_ids"].shape[1]:]


def generation(model, config, **kwargs):
    return vsp.load_config(config).to_generation_config(model.generation_config, **kwargs)


def assert_same_tokens(a, b):
    assert a.shape == b.shape and torch.equal(a, b), f"{a.tolist()} != {b.tolist()}"
