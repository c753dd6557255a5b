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

__all__ = ["H2O", "AsrKf", "AsrKfFollow", "AsrKfQ8", "AsrKfRecall", "AsrKfTwice", "ContextShift", "EntropyRule", "Full",
           "Oracle", "OracleNext", "Policy", "PolicyContext", "Q4Cache", "Q8Cache", "Recovery", "Schedule", "ScoringPolicy",
           "Streaming", "default_layers", "make_policy", "policy_class", "policy_names"]
