"""Speculative decoding with prompt lookup against plain decoding, same run: a task whose text
copies its prompt (a story, then its first words again) and one with nothing to copy.

    python scripts/speculative_bench.py PACKAGE [THREADS] [K,K,...] [NEW_TOKENS]
"""
import sys, statistics, nextoken
e = nextoken.Engine(sys.argv[1], plugins=False, threads=int(sys.argv[2]) if len(sys.argv) > 2 else None, spin=False)
KS = [int(k) for k in (sys.argv[3] if len(sys.argv) > 3 else "2,4,8").split(",")]
NEW = int(sys.argv[4]) if len(sys.argv) > 4 else 150
base = e.encode("Once upon a time")
story = e.generate(base, max_new_tokens=400).token_ids
tasks = {"copies its prompt": base + story[:300] + base + story[:24],
         "nothing to copy": e.encode("The little dog")}
for name, prompt in tasks.items():
    for k in KS:
        plain, spec, same, acc = [], [], True, []
        for _ in range(5):
            a = e.generate(prompt, max_new_tokens=NEW)
            b = e.generate(prompt, max_new_tokens=NEW, speculative={"method": "prompt_lookup", "k": k})
            plain.append(a.usage.decode_tokens_per_s); spec.append(b.usage.decode_tokens_per_s)
            same &= a.token_ids == b.token_ids
            acc.append((b.usage.accepted_tokens, b.usage.proposed_tokens))
        p, s = statistics.median(plain), statistics.median(spec)
        print(f"{name:18} k={k}: plain {p:.0f} tok/s, prompt lookup {s:.0f} tok/s ({s/p:.2f}x), "
              f"kept {acc[-1][0]}/{acc[-1][1]} guesses, identical {same}")
