"""KV policies behind one protocol (:mod:`.base`), registered by name in the order imported here:
``full``, ours (``asrkf``), the dropping baselines, the bench's oracle, llama.cpp's quantized caches. A new policy is a module
here with a dataclass that sets ``name``; importing it below registers it everywhere (CLI, bench, chats)."""

from . import asrkf, dropping, oracle, quantized  # noqa: F401  (registration order)
from .asrkf import AsrKf, AsrKfFollow, AsrKfQ8, AsrKfRecall, AsrKfTwice
from .base import Full, Policy, PolicyContext, ScoringPolicy, default_layers, make_policy, policy_class, policy_names
from .dropping import H2O, ContextShift, Streaming
from .oracle import Oracle, OracleNext
from .quantized import Q4Cache, Q8Cache
from .recovery import EntropyRule, Recovery
from .schedule import Schedule

DEFAULT_POLICY = AsrKfRecall.name
"""What ``run``, ``chat``, ``serve`` and the Python API use unless told otherwise: asrkf with recall, which keeps full's
answers at a third of the KV where plain asrkf loses them (bench, budget 0.35, 4k: multi-turn 5 and 3 of full's 6,
mean KL divergence at 2k 0.014 against 0.067; docs/RESULTS.md) at full's decode speed or better from 2k tokens on two
CPU cores. With layers on a GPU it runs as asrkf (recall writes the cache through host memory)."""

__all__ = ["DEFAULT_POLICY", "H2O", "AsrKf", "AsrKfFollow", "AsrKfQ8", "AsrKfRecall", "AsrKfTwice", "ContextShift", "EntropyRule", "Full",
           "Oracle", "OracleNext", "Policy", "PolicyContext", "Q4Cache", "Q8Cache", "Recovery", "Schedule", "ScoringPolicy",
           "Streaming", "default_layers", "make_policy", "policy_class", "policy_names"]
