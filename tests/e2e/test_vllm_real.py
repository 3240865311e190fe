"""The vllm framework end to end on the real vLLM (vLLM 0.32's CPU build serving Gemma 3 270M),
one appliance for the module: created through LLM Engine's client and through REST, then the
OpenAI SDK (chat, completion, stream, response_format), LLM Engine's completions (guided
decoding, log-probabilities, stop sequences, sampling parameters), the scaler driven by
vLLM's own /metrics (up on load, down to zero and back), an edit rolled under traffic without
a failed request, and a delete that leaves no container. And every call of LLM Engine's client
on one install where a vLLM, a llama.cpp and a custom endpoint are live at once.

vLLM needs about a minute and 5 GiB per replica: the module never runs more than two.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from builder.scale import parse_server_load
from tests.e2e.lifecycle import container_state, create, describe, live_replicas, wait_status
from tests.e2e.real_vllm import (
    READY_TIMEOUT_S,
    completion,
    llmengine,
    metrics,
    openai_client,
    replica_url,
    vllm_body,
)
from tests.harness import GEMMA_FILE, LLAMACPP_IMAGE, Appliance, wait_until

NAME = "gemma-vllm"
TRAFFIC_PAUSE_S = 0.5  # between a sender's requests: steady traffic that leaves the new
# replica some of these 2 cores to start on
STARTS_A_REPLICA = pytest.mark.timeout(2 * READY_TIMEOUT_S)  # a vLLM start on a busy box
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "colour": {"enum": ["red", "green", "blue"]},
        "likes_cats": {"type": "boolean"},
    },
    "required": ["name", "colour", "likes_cats"],
    "additionalProperties": False,
}
# a small model given free rein on whitespace may indent forever: show it the compact form
PERSON_PROMPT = (
    'Describe a person as compact JSON on one line, like {"name":"Ann","colour":"red",'
    '"likes_cats":false}.'
)


@pytest.fixture(scope="module")
def appl(make_module_appliance: Callable[..., Appliance]) -> Appliance:
    return make_module_appliance(
        APPLIANCE_ACTIVATION_TIMEOUT_S=str(READY_TIMEOUT_S),
        APPLIANCE_APPROVED_IMAGES=json.dumps([LLAMACPP_IMAGE]),  # for a custom endpoint
    )


@pytest.fixture(scope="module")
def gemma_created(appl: Appliance) -> str:
    """The module's endpoint, created through REST (not waited for); its id."""
    return create(appl.client(), vllm_body(NAME))


@pytest.fixture(scope="module")
def gemma(appl: Appliance, gemma_created: str) -> Iterator[str]:
    """The module's endpoint, READY."""
    wait_status(appl.client(), gemma_created, "READY", timeout_s=READY_TIMEOUT_S)
    yield gemma_created


@STARTS_A_REPLICA
def test_llmengine_model_create_serves_then_delete_leaves_only_the_other(
    appl: Appliance, gemma_created: str
) -> None:
    """Made with LLM Engine's client while the module's REST-made endpoint starts."""
    made = llmengine(
        appl,
        """
        made = Model.create(
            name="client-vllm", model="gemma-3-270m", inference_framework_image_tag="latest",
            checkpoint_path="gemma-3-270m-hf", num_shards=0, gpus=0, cpus=2, memory="7Gi",
            min_workers=1, max_workers=1, per_worker=2, max_model_len=2048,
            labels={"team": "ml", "product": "demo"}, enforce_eager=True, dtype="bfloat16",
        )
        result = made.endpoint_creation_task_id
        """,
    )
    wait_status(appl.client(), made, "READY", timeout_s=READY_TIMEOUT_S)
    chat = openai_client(appl).chat.completions.create(
        model="client-vllm",
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content
    replica = live_replicas(appl.client(), made)[0]["container_name"]
    assert llmengine(appl, 'result = Model.delete("client-vllm").deleted') is True
    wait_until(lambda: container_state(replica) == "", 120, "its replica to be removed")


@STARTS_A_REPLICA
def test_a_generative_model_run_for_pooling_serves_embeddings(
    appl: Appliance, gemma_created: str
) -> None:
    """vLLM's --runner pooling (through extra_flags) makes a generative model an embedding
    one, as Qwen3-Embedding and its like are served: the OpenAI SDK's embeddings work, tokens
    counted; its chat is a 400 that says the endpoint does not serve it."""
    client = appl.client()
    flags = {"--runner": "pooling", "--convert": "embed"}
    made = create(client, vllm_body("gemma-embed", extra_flags=flags, per_worker=2))
    wait_status(client, made, "READY", timeout_s=READY_TIMEOUT_S)
    sdk = openai_client(appl)
    got = sdk.embeddings.create(model="gemma-embed", input=["hello world", "bonjour le monde"])
    vectors = [item.embedding for item in got.data]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    assert vectors[0] != vectors[1]
    assert got.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model="gemma-embed", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert "does not serve /v1/chat/completions" in str(refused.value)
    replica = live_replicas(client, made)[0]["container_name"]
    assert client.delete(f"/v1/model-endpoints/{made}").status_code == 200
    wait_until(lambda: container_state(replica) == "", 120, "its replica to be removed")


def test_openai_sdk_chat_completion_and_stream(appl: Appliance, gemma: str) -> None:
    sdk = openai_client(appl)
    chat = sdk.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.model == NAME and chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    text = sdk.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12)
    assert text.choices[0].text.strip()
    stream = sdk.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 2 and "".join(pieces).strip()


def test_the_responses_api_answers_streams_and_counts_its_tokens(
    appl: Appliance, gemma: str
) -> None:
    """OpenAI's Responses API on vLLM's own /v1/responses, through the SDK: a response, one
    streamed with the SDK's helper, and a structured one (`text.format`); their tokens counted
    by the appliance as the replica reported them."""
    sdk = openai_client(appl)
    before = tokens_counted(appl)
    reply = sdk.responses.create(
        model=NAME, input="What is the capital of France?", max_output_tokens=12, temperature=0
    )
    assert reply.model == NAME and reply.output_text, reply
    assert reply.usage is not None and 0 < reply.usage.output_tokens <= 12, reply.usage
    with sdk.responses.stream(
        model=NAME,
        instructions="Answer briefly.",
        input=[{"role": "user", "content": "Count to five."}],
        max_output_tokens=16,
        temperature=0,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 2 and "".join(deltas) == final.output_text, (deltas, final)
    assert final.usage is not None and 0 < final.usage.output_tokens <= 16
    person = sdk.responses.create(
        model=NAME,
        input=PERSON_PROMPT,
        max_output_tokens=60,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
    )
    jsonschema.validate(json.loads(person.output_text), PERSON)
    assert person.usage is not None
    asked = reply.usage.output_tokens + final.usage.output_tokens + person.usage.output_tokens
    wait_until(lambda: tokens_counted(appl) - before == asked, 10, "the tokens to be counted")


def tokens_counted(appl: Appliance) -> int:
    """The completion tokens the appliance's accounting holds for the endpoint, all keys."""
    text = appl.client().get("/metrics").text
    pattern = (
        rf'appliance_tokens_total{{[^}}]*endpoint="{NAME}"[^}}]*kind="completion"[^}}]*}} (\S+)'
    )
    return sum(int(float(count)) for count in re.findall(pattern, text))


def test_response_format_json_schema_returns_json_that_validates(
    appl: Appliance, gemma: str
) -> None:
    chat = openai_client(appl).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": PERSON_PROMPT}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    jsonschema.validate(json.loads(chat.choices[0].message.content or ""), PERSON)


def test_llmengine_guided_json_and_choice_conform(appl: Appliance, gemma: str) -> None:
    out = llmengine(
        appl,
        f"""
        person = Completion.create(model="{NAME}", prompt="A person as JSON:",
                                   max_new_tokens=60, temperature=0.0, guided_json={PERSON!r})
        colour = Completion.create(model="{NAME}", prompt="My favourite colour is",
                                   max_new_tokens=5, temperature=0.0,
                                   guided_choice=["crimson", "teal"])
        try:
            Completion.create(model="{NAME}", prompt="x", max_new_tokens=5,
                              guided_regex="[0-9]+", guided_choice=["a"])
            twice = None
        except Exception as exc:
            twice = f"{{type(exc).__name__}}: {{exc}}"
        result = [person.output.text, colour.output.text, twice]
        """,
    )
    person, colour, twice = out
    jsonschema.validate(json.loads(person), PERSON)
    assert colour in ("crimson", "teal")
    assert twice.startswith("BadRequestError") and "guided_choice" in twice, twice


def test_return_token_log_probs_gives_each_token_its_log_probability(
    appl: Appliance, gemma: str
) -> None:
    reply = appl.client().post(
        f"/v1/llm/completions-sync?model_endpoint_name={NAME}",
        json={
            "prompt": "The capital of France is",
            "max_new_tokens": 6,
            "temperature": 0,
            "return_token_log_probs": True,
        },
    )
    assert reply.status_code == 200, reply.text
    output = reply.json()["output"]
    tokens = output["tokens"]
    assert len(tokens) == output["num_completion_tokens"] == 6
    assert all(t["log_prob"] <= 0 for t in tokens)
    assert "".join(t["token"] for t in tokens) == output["text"]


def v1_text(appl: Appliance, prompt: str, **fields: Any) -> str:
    body = {"prompt": prompt, "max_new_tokens": 24, "temperature": 0, **fields}
    reply = appl.client().post(f"/v1/llm/completions-sync?model_endpoint_name={NAME}", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["output"]["text"])


def test_a_stop_sequence_stops_the_text(appl: Appliance, gemma: str) -> None:
    prompt = "The capital of France is"
    free = v1_text(appl, prompt)
    stop = next(w for w in free.split()[2:] if free.index(w) > 10)
    cut = v1_text(appl, prompt, stop_sequences=[stop])
    assert cut == free[: free.index(stop)]
    kept = v1_text(appl, prompt, stop_sequences=[stop], include_stop_str_in_output=True)
    assert kept == free[: free.index(stop) + len(stop)]


def test_sampling_parameters_change_the_text(appl: Appliance, gemma: str) -> None:
    prompt = "My favourite food is"
    greedy = v1_text(appl, prompt)
    sampled = {v1_text(appl, prompt, temperature=1.0) for _ in range(3)}
    assert len(sampled) > 1  # sampling at temperature 1 varies...
    assert v1_text(appl, prompt, temperature=1.0, top_k=1) == greedy  # ...unless top_k is 1
    narrow = {v1_text(appl, prompt, temperature=1.0, top_p=0.000001) for _ in range(2)}
    assert len(narrow) == 1  # ...or top_p leaves one token
    assert v1_text(appl, prompt, frequency_penalty=2.0) != greedy
    assert v1_text(appl, prompt, presence_penalty=2.0) != greedy


def test_skip_special_tokens_false_keeps_them_in_the_text(appl: Appliance, gemma: str) -> None:
    prompt = "Hello " + "<mask> " * 10  # the model goes on with the special token <mask>
    kept = v1_text(appl, prompt, max_new_tokens=4, skip_special_tokens=False)
    assert "<mask>" in kept, kept
    assert "<mask>" not in v1_text(appl, prompt, max_new_tokens=4)


# Every call of LLM Engine's client against one install with a vLLM, a llama.cpp and a custom
# endpoint live at once (the client's enums know only vLLM: the others are listed as what
# docs/llm-engine.md says).
EVERY_CALL = """
import asyncio
import time
from llmengine import File, FineTune
from llmengine.data_types import (
    CreateBatchCompletionsModelConfig, CreateBatchCompletionsRequestContent)

def words(call):
    try:
        return ["ok", call()]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]

result = {}
result["list"] = sorted(
    [m.name, m.inference_framework.value] for m in Model.list().model_endpoints)
result["get"] = [Model.get(n).status.value for n in NAMES]
Model.update("one-llama", max_workers=2)
got = Model.get("one-llama").spec
result["updated"] = [got.deployment_state.max_workers, got.labels]
result["download"] = words(lambda: sorted(Model.download("one-llama").urls))
for name in NAMES:
    result[name] = [
        words(lambda: Completion.create(model=name, prompt="One, two,", max_new_tokens=3,
                                        temperature=0.0).output.text),
        words(lambda: asyncio.run(Completion.acreate(
            model=name, prompt="One, two,", max_new_tokens=3, temperature=0.0)).output.text),
        words(lambda: "".join(c.output.text for c in Completion.create(
            model=name, prompt="One, two,", max_new_tokens=3, temperature=0.0, stream=True)
            if c.output)),
    ]
content = CreateBatchCompletionsRequestContent(
    prompts=["Count: 1,", "Count: 5,"], max_new_tokens=2, temperature=0.0)
config = CreateBatchCompletionsModelConfig(model="one-llama", labels={"team": "test"})
job = Completion.batch_create(output_data_path="o.jsonl", model_config=config, content=content)
for _ in range(240):
    status = Completion.get_batch_completion(job.job_id)["job"]["status"]
    if status in ("completed", "failed", "cancelled", "expired"):
        break
    time.sleep(0.5)
result["batch"] = status
second = Completion.batch_create(output_data_path="p.jsonl", model_config=config, content=content)
result["cancel"] = words(lambda: Completion.cancel_batch_completion(second.job_id))
made = File.upload(open(PATH, "rb"))
result["file"] = [File.get(made.id).size, made.id in [f.id for f in File.list().files],
                  File.download(made.id).content, File.delete(made.id).deleted]
result["fine_tune"] = words(lambda: FineTune.list())
"""


def test_every_llmengine_call_on_one_install_with_vllm_llamacpp_and_custom_endpoints(
    appl: Appliance, gemma: str, tmp_path: Any
) -> None:
    client = appl.client()
    llama = {"name": "one-llama", "model_name": "gemma-3-270m", "labels": {"team": "ml"}}
    llama |= {"inference_framework": "llamacpp", "checkpoint_path": GEMMA_FILE, "metadata": {}}
    custom = {"name": "one-custom", "model_name": "gemma", "labels": {}, "metadata": {}}
    custom |= {"inference_framework": "custom", "image": LLAMACPP_IMAGE, "port": 8080}
    custom |= {"healthcheck_route": "/health", "command": ["-m", f"/models/{GEMMA_FILE}"]}
    custom["command"] += ["--host", "0.0.0.0", "--port", "8080", "--alias", "one-custom"]
    made = [
        create(client, {**body, "min_workers": 1, "max_workers": 1, "per_worker": 2})
        for body in (llama, custom)
    ]
    for endpoint_id in made:
        wait_status(client, endpoint_id, "READY", timeout_s=180)
    appl.start_role("worker")
    upload = tmp_path / "notes.txt"
    upload.write_text("kept as written")
    names = [NAME, "one-llama", "one-custom"]
    out = llmengine(appl, f"NAMES = {names!r}\nPATH = {str(upload)!r}\n" + EVERY_CALL)
    print(json.dumps(out, indent=1))
    # the client's enums know only vLLM: every endpoint is listed as one (docs/llm-engine.md)
    assert out["list"] == sorted([name, "vllm"] for name in names)
    assert out["get"] == ["READY"] * 3
    assert out["updated"] == [2, {"team": "ml"}]
    assert out["download"][0] == "ok" and GEMMA_FILE in json.dumps(out["download"][1])
    for name in names:  # a custom image that serves LLM Engine's routes gets them too
        assert [call[0] for call in out[name]] == ["ok"] * 3, out[name]
        assert all(call[1] for call in out[name]), out[name]
    assert out["batch"] == "completed" and out["cancel"][0] == "ok"
    assert out["file"] == [15, True, "kept as written", True]
    assert out["fine_tune"][0] != "ok" and "not available" in out["fine_tune"][1]
    for endpoint_id in made:
        assert client.delete(f"/v1/model-endpoints/{endpoint_id}").status_code == 200


def stream_directly(url: str, key: str, results: list[int], stop: threading.Event) -> None:
    """A long completion sent to the replica itself (with the replica's own key), not
    through the appliance, read until `stop` is set (then the connection is closed, which ends
    it in vLLM: the test has no need of its 300 tokens once the scaler has decided)."""
    body = {"model": NAME, "prompt": "Tell a long story.", "max_tokens": 300, "stream": True}
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers=auth, timeout=600
    ) as reply:
        results.append(reply.status_code)
        for _ in reply.iter_bytes():
            if stop.is_set():
                break


def scaled_events(client: httpx.Client, endpoint_id: str) -> list[str]:
    events = client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    return [e["message"] for e in events if e["kind"] == "scaled"]


@STARTS_A_REPLICA
def test_the_scaler_adds_a_replica_on_the_load_vllm_reports(appl: Appliance, gemma: str) -> None:
    client = appl.client()
    reply = client.put(f"/v1/model-endpoints/{gemma}", json={"max_workers": 2, "per_worker": 1})
    assert reply.status_code == 200, reply.text
    container = live_replicas(client, gemma)[0]["container_name"]
    url = replica_url(container)
    assert parse_server_load(metrics(url)) == (0, 0)
    results: list[int] = []
    key = appl.replica_key(container)
    stop = threading.Event()
    threads = [
        threading.Thread(target=stream_directly, args=(url, key, results, stop)) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    try:
        # the appliance carries none of these requests: only vLLM's /metrics shows them
        wait_until(lambda: sum(parse_server_load(metrics(url))) >= 2, 120, "vLLM to report load")
        wait_until(
            lambda: describe(client, gemma)["deployment_state"]["desired_workers"] == 2,
            60,
            "the scaler to want a second replica",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(600)
    assert results == [200, 200, 200]
    assert any("from 1 to 2: load" in m for m in scaled_events(client, gemma))
    wait_until(lambda: len(appl.containers()) == 2, 120, "a second replica started")
    client.put(f"/v1/model-endpoints/{gemma}", json={"max_workers": 1, "per_worker": 4})
    wait_until(lambda: len(appl.containers()) == 1, 120, "back to one replica")


@STARTS_A_REPLICA
def test_an_edit_rolls_under_traffic_without_a_failed_request(appl: Appliance, gemma: str) -> None:
    client = appl.client()
    before = {r["container_name"] for r in live_replicas(client, gemma)}
    results: list[int | str] = []
    stop = threading.Event()

    def traffic() -> None:
        worker = appl.client()
        while not stop.wait(TRAFFIC_PAUSE_S):
            try:
                body = {"model": NAME, "prompt": "Hello", "max_tokens": 4}
                results.append(worker.post("/v1/completions", json=body).status_code)
            except httpx.HTTPError as exc:
                results.append(repr(exc))

    senders = [threading.Thread(target=traffic) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        reply = client.put(f"/v1/model-endpoints/{gemma}", json={"max_num_seqs": 16})
        assert reply.status_code == 200, reply.text
        wait_status(client, gemma, "READY", timeout_s=READY_TIMEOUT_S, generation=2)
        wait_until(
            lambda: (
                before.isdisjoint(r["container_name"] for r in live_replicas(client, gemma))
                and len(appl.containers()) == 1
            ),
            120,
            "the old replica to be drained and removed",
        )
    finally:
        stop.set()
        for sender in senders:
            sender.join(120)
    assert len(results) > 10 and set(results) == {200}, results


@STARTS_A_REPLICA
def test_scales_to_zero_and_a_request_wakes_it(appl: Appliance, gemma: str) -> None:
    client = appl.client()
    reply = client.put(
        f"/v1/model-endpoints/{gemma}", json={"min_workers": 0, "idle_timeout_seconds": 5}
    )
    assert reply.status_code == 200, reply.text
    wait_until(lambda: appl.containers() == [], 180, "the idle endpoint at zero")
    client.timeout = httpx.Timeout(READY_TIMEOUT_S)  # the request waits for a cold start
    woke = completion(client, NAME, "Hello", 4)
    assert woke["choices"][0]["text"]
    messages = scaled_events(client, gemma)
    assert any("to 0: idle" in m for m in messages), messages
    assert any("from 0 to 1: a request is waiting" in m for m in messages), messages


def test_delete_leaves_no_container(appl: Appliance, gemma: str) -> None:
    client = appl.client()
    assert client.delete(f"/v1/llm/model-endpoints/{NAME}").status_code == 200
    wait_until(lambda: appl.containers() == [], 120, "every replica removed")
    wait_until(
        lambda: client.get(f"/v1/model-endpoints/{gemma}").status_code == 404,
        60,
        "the endpoint row removed",
    )
