"""The gateway: ``vlm-safety serve --upstream URL``, the policy in front of any OpenAI-compatible engine.

``engine.UpstreamEngine`` runs each defense where it can (in this process on the
conversation and the engine's answers, or inside a vLLM engine through our plugin);
``call.GatewayRequest`` is one request's chain of gateway-side defenses; ``upstream.Upstream``
is the engine as the gateway reaches it (HTTP, what the engine can do,
its errors as 502/503).
"""
