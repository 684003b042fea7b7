"""Embedding nextoken: load a package, generate, stream a batch. Run: python examples/embed.py PACKAGE"""

import sys

import nextoken

if len(sys.argv) != 2:
    sys.exit("usage: python examples/embed.py PACKAGE (a directory made by `nextoken export MODEL -o PACKAGE`)")
package = sys.argv[1]

with nextoken.Engine(package) as engine:  # device="auto": CUDA if usable, else CPU
    # One prompt, to the end.
    result = engine.generate("Once upon a time", max_new_tokens=32)
    print(result.text)
    print(
        result.finish_reason, result.usage.completion_tokens, "tokens,", f"{result.usage.decode_tokens_per_s:.0f} tok/s"
    )

    # A batch of prompts, streamed: each event is one sequence's text delta.
    params = nextoken.SamplingParams(max_new_tokens=16)
    texts = ["", ""]
    for event in engine.stream(["Lily went", "The sun"], params):
        texts[event.index] += event.text
    print(texts)

    # Bad input is a clear error of nextoken's own, and the engine keeps working.
    try:
        engine.generate("Once upon a time", max_new_tokens=0)
    except nextoken.InvalidRequestError as err:
        print("error:", err)
