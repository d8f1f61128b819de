"""Multi-turn environments: tools, an optional simulated user, rewards with named parts."""

from stagewise.envs.base import Environment, TextTask, TRLEnvironment  # noqa: F401
from stagewise.envs.tools import call_tool, parse_tool_calls, tool_schema  # noqa: F401
