"""KV policies behind one protocol (:mod:`.base`), registered by name in the order imported here:
``full``, ours (``asrkf``), the dropping baselines, the bench's oracle, llama.cpp's quantized caches. A new policy is a module
here with a dataclass that sets ``name``; importing it below registers it everywhere (CLI, bench, chats)."""

from . import asrkf, dropping, oracle, quantized  # noqa: F401  (registration order)
from .asrkf import AsrKf, AsrKfFollow, AsrKfQ4, AsrKfQ8, AsrKfQ8Q4, AsrKfRecall, AsrKfTwice
from .base import Full, Policy, PolicyContext, ScoringPolicy, default_layers, make_policy, policy_class, policy_names
from .dropping import H2O, ContextShift, Streaming
from .oracle import Oracle, OracleNext
from .quantized import Q4Cache, Q8Cache
from .recovery import EntropyRule, Recovery
from .schedule import Schedule

DEFAULT_POLICY = AsrKf.name
"""What ``run``, ``chat``, ``serve`` and the Python API use unless told otherwise. asrkf, not asrkf-recall: recall
diverges a third to a fifth as much from full (mean KLD at 2k, 0.35: 0.014 against 0.067 over six texts), yet on
prose and facts it was never tuned on it answered no more (Apache-2.0 + MPL-2.0, 1k / 2k / 4k, 0.35: needle 3 / 4 / 6
against asrkf's 4 / 6 / 5, multi-turn 3 / 4 / 3 against 3 / 4 / 3; full 5 / 6 / 4 and 3 / 5 / 3) and decodes a
2k document at 39 tok/s against asrkf's 68 and full's 54 (2 Xeon cores, flash attention off; docs/RESULTS.md,
twentieth session). Since the twenty-second session asrkf reads a prompt's newest 2,048 tokens with recall as
asrkf-recall does (its decoding unchanged): the two differ in the decode only."""

__all__ = ["DEFAULT_POLICY", "H2O", "AsrKf", "AsrKfFollow", "AsrKfQ4", "AsrKfQ8", "AsrKfQ8Q4", "AsrKfRecall", "AsrKfTwice", "ContextShift",
           "EntropyRule", "Full", "Oracle", "OracleNext", "Policy", "PolicyContext", "Q4Cache", "Q8Cache", "Recovery", "Schedule",
           "ScoringPolicy", "Streaming", "default_layers", "make_policy", "policy_class", "policy_names"]
