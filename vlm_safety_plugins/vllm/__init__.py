"""The defenses inside a vLLM engine (V1): plugins vLLM loads, per request, without a fork.

- ``processor.SafetyLogitsProcessor``: a V1 logits processor, registered for every vLLM server
  through the entry-point group ``vllm.logits_processors``; inert for a request that asks
  for nothing, it forces the answer prefix of one that does (ETA's interference prefix) and
  builds its steering for the hooks.
- ``steering``: CMRM and VLM-Guard as forward hooks on vLLM's decoder layers, per request,
  installed through ``vllm.general_plugins`` when the operator's policy enables steering.
- ``salt``: prefix caching salted per steering configuration (an ASGI middleware for
  ``vllm serve``, and ``cache_salt`` in process).
- ``requests``: a request's flags (``SamplingParams.extra_args["vlm_safety"]``, a JSON string;
  ``vllm_xargs`` over HTTP), the operator's policy given at start (``VLM_SAFETY_POLICY``),
  and what of them runs in the engine (``Defense.engine_work``).
- ``checkpoint``: a model folder in the key layout vLLM loads (llava-hf's).

Only ``processor`` and ``steering``'s hooks import vLLM; nothing does at package import.
"""
