"""``asrkf-edge bench``: the prompts with known answers (:mod:`.tasks`), the suites that run every policy on
them (:mod:`.suites`), the Markdown report (:mod:`.report`) and the charts (:mod:`.plots`)."""

from .report import report
from .suites import SUITES, Plan, Record, machine, peak_rss_mb

__all__ = ["SUITES", "Plan", "Record", "machine", "peak_rss_mb", "report"]
