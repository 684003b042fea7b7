"""Per-step time outside session.run: Engine.generate at batch 1 and 8, and the Scheduler with 8 requests.

    python scripts/step_overhead.py PACKAGE THREADS NEW_TOKENS RUNS [chain [timed]]

``chain``: the full built-in chain (temperature, top-k, top-p, repetition penalty, two stop strings);
``timed``: with hook_timings on. Medians over RUNS. To compare with an older commit, install that
commit's tree beside this one and put it first on the path (the script reads which one it ran):

    git archive OLD --prefix=old/ | tar -x -C /tmp && pip install -q --no-deps --target /tmp/old_site /tmp/old
    PYTHONPATH=/tmp/old_site python scripts/step_overhead.py PKG 1 128 11; python scripts/step_overhead.py PKG 1 128 11
"""

import statistics
import sys
import time

import nextoken
from nextoken import Engine, Scheduler

pkg, threads, new, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
chain = len(sys.argv) > 5 and sys.argv[5] == "chain"
timings = len(sys.argv) > 6 and sys.argv[6] == "timed"
engine = Engine(pkg, threads=threads, spin=False, plugins=False)
inside = [0.0, 0]
from nextoken.runner import StepRunner

real = StepRunner._run  # the session's run, in both versions: timed from outside it


def timed(self, b, cache):
    t = time.perf_counter()
    real(self, b, cache)
    inside[0] += time.perf_counter() - t
    inside[1] += 1


StepRunner._run = timed
prompt = list(range(5, 37))
kw = dict(max_new_tokens=new, ignore_eos=True)
if chain:
    kw.update(
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        repetition_penalty=1.1,
        seed=0,
        stop=("<<no such stop>>", "THE END OF IT ALL"),
    )
if timings:
    kw.update(hook_timings=True)


def measure(fn):
    out = []
    for _ in range(runs):
        inside[:] = [0.0, 0]
        t = time.perf_counter()
        steps = fn()
        wall = time.perf_counter() - t
        out.append((wall - inside[0]) / steps * 1e3)
    return statistics.median(out)


def gen(b):
    def f():
        engine.generate([prompt] * b if b > 1 else prompt, **kw)
        return new

    return f


def sched():
    s = Scheduler(engine, max_batch=8)
    for _ in range(8):
        s.submit(prompt, **kw)
    n = 0
    while s.step():
        n += 1
    return n + 1


gen(1)()
gen(8)()
sched()
where = (
    "this tree"
    if nextoken.__file__.startswith(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    else "other"
)
print(
    f"{where:>9} {pkg.split('/')[-1][:24]:>24} {'chain' if chain else 'greedy':6}{' timed' if timings else '':6} "
    f"b1 {measure(gen(1)):.4f}  b8 {measure(gen(8)):.4f}  sched8 {measure(sched):.4f}  ms/step outside session.run"
)
