"""A 10-turn chat through the server with and without the prefix cache: total prefill time, tokens
reused, and whether the answers are the same.

    python scripts/prefix_cache_chat.py PACKAGE     (a package with a chat template)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from helpers import serving

pkg = sys.argv[1]


def run(cache_bytes):
    with serving(pkg, "m", engine_options={"prefix_cache_bytes": cache_bytes, "threads": 2, "spin": False}) as (
        client,
        engine,
        *_,
    ):
        messages = [
            {"role": "system", "content": "You are a helpful assistant who tells long stories about animals. " * 12}
        ]
        prefill, cached, texts = 0.0, 0, []
        for turn in range(10):
            messages.append(
                {"role": "user", "content": f"Tell me part {turn + 1} of the story about the fox and the owl."}
            )
            got = client.chat.completions.create(model="m", messages=messages, max_tokens=40, temperature=0)
            usage = got.model_extra["nextoken"]["usage"]
            prefill += usage["prefill_ms"]
            cached += got.usage.prompt_tokens_details.cached_tokens
            texts.append(got.choices[0].message.content)
            messages.append({"role": "assistant", "content": got.choices[0].message.content})
        held = engine.prefix_cache.stats if engine.prefix_cache else None
        return prefill, cached, texts, got.usage.prompt_tokens, held


cold, _, t1, last, _ = run(0)
warm, cached, t2, _, held = run(1 << 30)
print(
    f"10-turn chat through the server (threads 2, spin off): prefill {cold:.0f} ms without the cache, {warm:.0f} ms "
    f"with ({warm / cold:.3f}x); {cached} prompt tokens reused; last prompt {last} tokens; identical {t1 == t2}; "
    f"the cache held {held.bytes / 2**20:.0f} MiB in {held.entries} entries"
)
