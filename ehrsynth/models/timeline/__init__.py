"""The timeline family: one causal transformer over the whole patient timeline (CEHR-GPT style)."""

from ehrsynth.models.timeline.config import TimelineConfig
from ehrsynth.models.timeline.model import TimelineModel

__all__ = ["TimelineConfig", "TimelineModel"]
