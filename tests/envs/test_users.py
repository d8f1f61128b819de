"""Simulated users: an OpenAI-compatible endpoint (a real HTTP server in a thread), a local model,
and the scripted user that carries out a task's user-side actions."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from stagewise.envs.users import EndpointUser, LocalModelUser, ScriptedUser, build_user_simulator
from stagewise.errors import ConfigError, TrainingError


class FakeChatServer(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions: a tool call when tools are offered and the last message asks for
    the status bar, else the number of messages it received; records every request body."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatServer.requests.append((self.path, body))
        last = body["messages"][-1]["content"]
        if body.get("tools") and "status bar" in last:
            msg = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": "check_status_bar", "arguments": "{}"}}]}
        else:
            msg = {"role": "assistant", "content": f"heard {len(body['messages'])} messages"}
        out = json.dumps({"choices": [{"index": 0, "message": msg}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    FakeChatServer.requests = []
    httpd = HTTPServer(("127.0.0.1", 0), FakeChatServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_endpoint_user_keeps_the_conversation_from_the_users_side(server):
    tools = [{"type": "function", "function": {"name": "check_status_bar", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    session = EndpointUser(url=server, model="m").session(system="You are a customer.", tools=tools)
    assert session.first_message("Hi! How can I help you today?") == "heard 2 messages"
    turn = session.respond("Please check your status bar.")
    assert turn == {"tool_calls": [{"name": "check_status_bar", "arguments": {}}]}
    assert session.tool_results(["Status Bar: 5G"]) == {"content": "heard 6 messages"}
    path, body = FakeChatServer.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "m" and body["tools"] == tools
    # roles flipped: the agent speaks as "user", the simulated customer as "assistant"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert body["messages"][1]["content"] == "Hi! How can I help you today?"
    assert body["messages"][-1]["content"] == "[tool result] Status Bar: 5G"


def test_endpoint_that_does_not_answer_is_one_clear_error():
    user = EndpointUser(url="http://127.0.0.1:9/v1", retries=2, timeout_s=2)
    with pytest.raises(TrainingError, match=r"user simulator endpoint http://127.0.0.1:9/v1: no answer after 2 tries"):
        user.session(system="s", tools=[]).first_message("hi")


def test_scripted_user_carries_out_the_tasks_user_actions_then_stops():
    act = lambda name, who: SimpleNamespace(name=name, arguments={"on": True}, requestor=who)  # noqa: E731
    task = SimpleNamespace(id="t1",
                           user_scenario=SimpleNamespace(instructions=SimpleNamespace(reason_for_call="No data.")),
                           evaluation_criteria=SimpleNamespace(actions=[act("toggle_data", "user"),
                                                                        act("enable_roaming", "assistant"),
                                                                        act("toggle_roaming", "user")]))
    s = ScriptedUser(first="[{id}] {reason_for_call}").session(system="", tools=[], task=task)
    assert s.first_message("Hi!") == "[t1] No data."
    task.user_scenario.instructions.known_info = "You are Ann.\nYour user id is ann_1. "
    told = ScriptedUser(first="{known_info}\n{reason_for_call}").session(system="", tools=[], task=task)
    assert told.first_message("Hi!") == "You are Ann.\nYour user id is ann_1.\nNo data."
    assert s.respond("Turn on data.") == {"tool_calls": [{"name": "toggle_data", "arguments": {"on": True}}]}
    assert s.tool_results(["ok"]) == {"content": "Done."}
    assert s.respond("Now roaming.") == {"tool_calls": [{"name": "toggle_roaming", "arguments": {"on": True}}]}
    assert s.respond("Anything else?") == {"content": "###STOP###"}
    fixed = ScriptedUser(replies=["My id is 7."], actions=False).session(system="", tools=[], task=task)
    assert fixed.respond("Your id?") == {"content": "My id is 7."}
    assert fixed.respond("Thanks.") == {"content": "###STOP###"}


def test_local_model_user_answers_greedily_and_deterministically(tiny_chat_dir):
    user = LocalModelUser(model=str(tiny_chat_dir), max_new_tokens=5)
    a = user.session(system="You are a customer.", tools=[]).first_message("Hi! How can I help?")
    b = user.session(system="You are a customer.", tools=[]).first_message("Hi! How can I help?")
    assert isinstance(a, str) and a == b


def test_policy_user_is_the_current_stages_starting_weights(tmp_path, tiny_chat_dir, monkeypatch):
    """``model: policy`` answers as whatever weights the curriculum says the stage started from."""
    import stagewise.envs.users as users
    from tests.conftest import CHATML_TEMPLATE, make_tiny_dir

    other = make_tiny_dir(tmp_path / "other", seed=7, template=CHATML_TEMPLATE)
    monkeypatch.setattr(users, "_policy_weights", [])
    monkeypatch.setattr(users, "_user_models", {})
    loaded = []
    real = users._load_user_model
    monkeypatch.setattr(users, "_load_user_model",
                        lambda name, device, dtype: loaded.append(name) or real(name, device, dtype))

    def first(user):
        return user.session(system="You are a customer.", tools=[]).first_message("Hi! How can I help?")

    policy = LocalModelUser(model="policy", max_new_tokens=5)
    with pytest.raises(ConfigError, match="exists only inside a run"):
        first(policy)
    users.set_policy_weights(str(tiny_chat_dir))
    assert first(policy) == first(LocalModelUser(model=str(tiny_chat_dir), max_new_tokens=5))
    users.set_policy_weights(str(other))
    first(policy)
    assert loaded == [str(tiny_chat_dir), str(tiny_chat_dir), str(other)]
    # the previous stage's policy copy is not kept (a whole model per GPU for the rest of the run)
    assert {k[0] for k in users._user_models} == {str(other)}


@pytest.mark.parametrize("spec,message", [
    ({"kind": "oracle"}, r"u\.kind: unknown user_simulator 'oracle'"),
    ({"kind": "endpoint"}, r"u: .*missing 1 required positional argument: 'url'"),
    ({"kind": "local", "dtype": "fp8"}, r"user simulator dtype: 'fp8' is not one of bfloat16, float16, float32"),
])
def test_bad_user_simulator_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_user_simulator(spec, "u")


def test_local_model_user_answers_several_conversations_in_one_batch(tiny_chat_dir, monkeypatch):
    """respond_all over three sessions of one local user: one sampler call for all three, the same
    greedy replies as answering each alone, and each session's history is its own."""
    import stagewise.generation.sampling as sampling
    from stagewise.envs.users import respond_all

    user = LocalModelUser(model=str(tiny_chat_dir), max_new_tokens=6, dtype="float32")
    texts = ["Which flight?", "Your user id, please.", "Anything else I can do for you today?"]
    alone = []
    for t in texts:
        s = user.session(system="You are a customer.", tools=[])
        alone.append(s.respond(t))
    calls = []
    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    sessions = [user.session(system="You are a customer.", tools=[]) for _ in texts]
    together = respond_all(sessions, texts)
    assert len(calls) == 1 and calls[0][0] == 3
    assert together == alone
    for s, t, turn in zip(sessions, texts, together):
        assert s.history[1:] == [{"role": "user", "content": t}, {"role": "assistant", "content": turn["content"]}]


def test_scripted_and_endpoint_sessions_answer_one_by_one_through_respond_all(server):
    from stagewise.envs.users import respond_all

    task = SimpleNamespace(evaluation_criteria=None, user_scenario=None)
    scripted = ScriptedUser(replies=["Seven."], actions=False).session(system="", tools=[], task=task)
    remote = EndpointUser(url=server).session(system="You are a customer.", tools=[])
    assert respond_all([scripted, remote], ["Your id?", "Hello?"]) == [{"content": "Seven."},
                                                                    {"content": "heard 2 messages"}]
