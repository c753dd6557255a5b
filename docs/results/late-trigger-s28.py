"""Scratch (twenty-eighth session; from the repository root: PYTHONPATH=. python docs/results/late-trigger-s28.py VARIANTS
[--gpu-mode] [--text FILE], the arguments of benchmarks/kld_variants.py): asrkf whose entropy trigger acts one token late, as it would if the entropy of a
token's logits were computed beside the next token's decode: the spike seen at token t swaps in what token t+1's
query wants and decodes t+1 again. Runs benchmarks/kld_variants.py's main with AsrKf.after_logits replaced."""
# ruff: noqa
import sys
sys.path.insert(0, "benchmarks")
from asrkf_edge.policies import asrkf
from asrkf_edge.policies.recovery import Recovery
from asrkf_edge.session import runs
from asrkf_edge.importance import entropy

def late_after_logits(self, ctx):
    if not ctx.n_frozen or self.trigger == "none":
        return
    h = float(entropy(ctx.logits()))
    threshold = self._monitor.threshold()
    fire, self._late_fire = getattr(self, "_late_fire", False), self._monitor.observe(h)
    if not fire:
        return
    rec = Recovery(ctx.step, ctx.n_logical, h, threshold, 0)
    swapped = self._swap_in(ctx)
    if swapped is None:
        return
    back, share = swapped
    rec.thawed, rec.ranges = len(back), runs(back)
    if len(back) and share >= self.redecode_mass:
        ctx.redecode()
        rec.entropy_after = float(entropy(ctx.logits()))
    self.recoveries.append(rec)

asrkf.AsrKf.after_logits = late_after_logits
import kld_variants
kld_variants.main()
