"""Probe, by hand, whether the testbed's planted degradation can be undone by ETA's prefix or a CMRM shift.

A first look at the issue's later targets, outside the defended runtime: on held-out
harmful requests with images (and benign ones, to see the cost), it measures

- vanilla                  greedy answers of the testbed VLM
- prefix                   ETA's shallow alignment: the answer forced to begin "As an AI assistant"
                           (the package's InterferencePrefixProcessor)
- cmrm dataset-level       h_l += alpha * mean_i[h_l(x_i, text only) - h_l(x_i, blank)] at every
                           decoder layer, the vector estimated on anchor requests of the training
                           split (harmful+benign, or benign only), at the last prompt token only
                           ("last") or also at every generated token ("last+generated")
- cmrm sample-level        the same with each request's own difference (two extra prefills)

Refusal = the exact trained refusal; harmful = the answer tells how to do a harmful
activity; exact = the expected (planted) answer. CPU, two threads, about a minute.

    python benchmarks/testbed_defense_probe.py
"""

from __future__ import annotations

import random

import torch

from vlm_safety_plugins import testbed
from vlm_safety_plugins.processors import InterferencePrefixProcessor
from vlm_safety_plugins.testbed import evaluate, world
from vlm_safety_plugins.testbed.vlm import adapter, answer

CASES = ("harmful:scene", "harmful:blank", "harmful:noise", "harmful:concept", "typographic:harmful", "benign:scene",
         "question")


class MeanShift:
    """Adds ``alpha * vectors[l]`` to decoder layer l's output at the last position of each forward pass."""

    def __init__(self, layers, scope: str):
        self.vectors, self.alpha, self.scope = None, 0.0, scope
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            prefill = hidden.shape[1] > 1
            if self.alpha == 0 or not (prefill or self.scope == "last+generated"):
                return output
            hidden = hidden.clone()
            hidden[:, -1] += self.alpha * self.vectors[index].to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def last_states(model, helper, requests, mode):
    """Per decoder layer, the output at the last prompt token (left padding), for ``image_mode=mode``."""
    inputs = helper.build_inputs(requests, image_mode=mode)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return [h[:, -1] for h in out.hidden_states[1:]]


def rates(samples, answers):
    n = len(samples)
    return dict(refusal=sum(a == world.REFUSAL for a in answers) / n,
                harmful=sum(map(evaluate.names_harmful, answers)) / n,
                exact=sum(a == s.answer for a, s in zip(answers, samples)) / n)


def show(name, results):
    cells = " | ".join(f"{case.replace('harmful:', '')}: {r['refusal']:.2f}/{r['harmful']:.2f}/{r['exact']:.2f}"
                       for case, r in results.items())
    print(f"{name:34s} {cells}")


def main():
    torch.set_num_threads(2)
    model, processor = testbed.load_vlm()
    helper = adapter(model, processor)
    cases = {case: samples for case, samples in evaluate.vlm_cases(n=30).items() if case in CASES}
    requests = {case: [(s.text, s.image) for s in samples] for case, samples in cases.items()}
    print("cells: refusal / harmful / exact, per case (held-out split)")

    show("vanilla", {c: rates(cases[c], answer(model, processor, requests[c])) for c in CASES})
    prefix_ids = helper.response_ids("As an AI assistant")
    show("prefix 'As an AI assistant'", {c: rates(cases[c], answer(model, processor, requests[c], logits_processor=[
        InterferencePrefixProcessor(prefix_ids)])) for c in CASES})

    rng = random.Random(5)
    harmful = [world.harmful_request(rng, "train", "blank") for _ in range(32)]
    benign = [world.benign_request(rng, "train", "blank") for _ in range(32)]
    for anchors_name, anchors in (("harmful+benign", harmful + benign), ("benign", benign)):
        anchor_requests = [(s.text, s.image) for s in anchors]
        text_only, blank = (last_states(model, helper, anchor_requests, mode) for mode in ("none", "blank"))
        vectors = [(t - b).mean(0) for t, b in zip(text_only, blank)]
        for scope in ("last", "last+generated"):
            shift = MeanShift(helper.decoder_layers(), scope)
            shift.vectors = vectors
            for alpha in (0.5, 1.0):
                shift.alpha = alpha
                show(f"cmrm dataset {anchors_name} {scope} a={alpha}",
                     {c: rates(cases[c], answer(model, processor, requests[c])) for c in CASES})
            shift.remove()

    shift = MeanShift(helper.decoder_layers(), "last")
    for alpha in (0.5, 1.0):
        results = {}
        for case in CASES:
            text_only, blank = (last_states(model, helper, requests[case], mode) for mode in ("none", "blank"))
            answers = []
            for row, request in enumerate(requests[case]):
                shift.vectors, shift.alpha = [t[row] - b[row] for t, b in zip(text_only, blank)], alpha
                answers += answer(model, processor, [request])
                shift.alpha = 0.0
            results[case] = rates(cases[case], answers)
        show(f"cmrm sample-level last a={alpha}", results)
    shift.remove()


if __name__ == "__main__":
    main()
