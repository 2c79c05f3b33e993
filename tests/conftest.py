"""Shared fixtures: fresh tiny models of every family, and in-process test plugins."""

import contextlib
import functools
import os
import socket

import pytest
import torch
from PIL import Image

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.testing import FAMILIES, tiny_vlm
from vlm_safety_plugins.testing.conformance import run_concurrently as concurrent  # noqa: F401 - used by tests

# Tiny models run several times faster on one thread than on torch's default pool.
torch.set_num_threads(1)

# Tests marked ``vllm`` (tests/test_vllm*.py) need vLLM: skipped, with the reason, where it cannot be
# imported. CI's vLLM environment sets this variable: there such a test that skips fails instead.
REQUIRE_VLLM = "VLM_SAFETY_REQUIRE_VLLM"


@functools.cache
def vllm_import_error() -> str | None:
    """Why ``import vllm`` fails here, or None when it imports."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # not only ImportError: a broken install raises what it raises
        return f"{type(error).__name__}: {error}"
    return None


def vllm_required() -> bool:
    return os.environ.get(REQUIRE_VLLM, "") not in ("", "0")


def pytest_runtest_setup(item):
    if item.get_closest_marker("vllm") is not None and (error := vllm_import_error()) is not None:
        reason = f"needs vLLM, which cannot be imported here ({error})"
        if vllm_required():
            pytest.fail(f"{REQUIRE_VLLM} is set but this test {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under VLM_SAFETY_REQUIRE_VLLM a ``vllm`` test that skips, for whatever reason, fails."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and vllm_required() and item.get_closest_marker("vllm"):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_VLLM} is set but this vLLM test skipped: {_skip_reason(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Under VLM_SAFETY_REQUIRE_VLLM a vLLM test module skipped whole (``pytest.importorskip``) fails."""
    report = yield
    if report.skipped and vllm_required() and collector.path.name.startswith("test_vllm"):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_VLLM} is set but this vLLM test module skipped: {_skip_reason(report)}"
    return report


def _skip_reason(report) -> str:
    longrepr = report.longrepr  # (path, line, "Skipped: reason") for a skip
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def vlm(family):
    """A fresh (model, processor) of ``family``; detached again after the test."""
    model, processor = tiny_vlm(family)
    yield model, processor
    vsp.detach(model)


@pytest.fixture(scope="module")
def offline():
    """Fail (and record, in case the caller swallows errors) any socket connection: nothing may touch the hub."""
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        yield
    assert not attempts


@pytest.fixture
def red_image():
    return Image.new("RGB", (48, 40), (220, 30, 30))


@pytest.fixture
def register():
    """Register in-process plugins for one test: ``register(defense_cls, ..., evaluators=(...), judges=(...))``."""
    registered = []

    def _register(*defense_classes, report_sink=None, evaluators=(), judges=()):
        class TestPlugin:
            @vsp.hookimpl
            def register_defenses(self, register):
                for cls in defense_classes:
                    register(cls)

            @vsp.hookimpl
            def register_evaluators(self, register):
                for cls in evaluators:
                    register(cls)

            @vsp.hookimpl
            def register_judges(self, register):
                for cls in judges:
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


def attach_unable_to_rebuild_images(model, processor):
    """Attach with an adapter that cannot rebuild raw images from ``pixel_values`` (as a family
    whose processor flattens them beyond recovery would): defenses needing images must be given ``images=``."""
    base = find_adapter(model, processor)

    class NoRebuild(type(base)):
        def rebuild_images(self, inputs):
            raise vsp.DefenseError(f"{type(self.base_model).__name__}: pass images=[...] to generate (one per row)")

    return vsp.attach(model, processor, adapter=NoRebuild(model, processor))


def batch(model, processor, requests):
    """Inputs for (text, image-or-None) requests built with the attached model's adapter."""
    attachment = vsp.get_attachment(model)
    adapter = attachment.adapter if attachment else find_adapter(model, processor)
    return adapter.build_inputs(requests)


def new_tokens(sequences, inputs):
    return sequences[:, inputs["input_ids"].shape[1] :]


def generation(model, config, **kwargs):
    return vsp.load_config(config).to_generation_config(model.generation_config, **kwargs)


@contextlib.contextmanager
def capture(layers):
    """Every output of every layer, in call order; hooks registered after the attachment's see edited states."""
    outputs = {index: [] for index in range(len(layers))}
    handles = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: outputs[i].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def assert_same_tokens(a, b):
    assert a.shape == b.shape and torch.equal(a, b), f"{a.tolist()} != {b.tolist()}"


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory):
    """``calibrated(family)`` -> (CMRM artifact path, VLM-Guard artifact path) of ``tiny_vlm(family)``,
    made once per session from a few of the shipped anchors."""
    from vlm_safety_plugins.defenses.cmrm.anchors import cmrm_anchors
    from vlm_safety_plugins.defenses.cmrm.calibration import calibrate_cmrm
    from vlm_safety_plugins.defenses.vlm_guard.anchors import vlm_guard_pairs
    from vlm_safety_plugins.defenses.vlm_guard.calibration import calibrate_vlm_guard

    folder, made = tmp_path_factory.mktemp("artifacts"), {}
    texts, pairs = cmrm_anchors()[0], vlm_guard_pairs()[0]
    anchors = texts[:12] + texts[-12:]  # harmful and benign

    def make(family):
        if family not in made:
            model, processor = tiny_vlm(family)
            cmrm = calibrate_cmrm(model, processor, anchors, batch_size=24).save(folder / f"{family}.cmrm.safetensors")
            guard = calibrate_vlm_guard(model, processor, pairs[:24], batch_size=24).save(
                folder / f"{family}.vlm_guard.safetensors"
            )
            made[family] = cmrm, guard
        return made[family]

    return make
