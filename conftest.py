"""Collection of the package's own modules (``--doctest-modules`` imports every one of them).

``vlm_safety_plugins/vllm/`` holds the modules that run inside a vLLM engine; some import vLLM at
module level (``processor.py`` subclasses its logits processor). Where vLLM is not installed they are
left out, as the tests marked ``vllm`` are skipped there (tests/conftest.py); under
``VLM_SAFETY_REQUIRE_VLLM`` (CI's vLLM environment) they are always collected.
"""

import importlib.util
import os
from pathlib import Path

VLLM_MODULES = Path(__file__).resolve().parent / "vlm_safety_plugins" / "vllm"


def pytest_ignore_collect(collection_path, config):
    if collection_path.resolve() != VLLM_MODULES or os.environ.get("VLM_SAFETY_REQUIRE_VLLM", "") not in ("", "0"):
        return None
    return True if importlib.util.find_spec("vllm") is None else None
