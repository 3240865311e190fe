"""LLM Engine's batch completions through its own client on the real model: 100 prompts to a
Gemma endpoint (llama.cpp) end with 100 outputs in the prompts' order (v1, prompts inline);
a second job (v2, prompts from an uploaded file) cancelled midway stops, keeping the outputs
it finished. Both run on the async workers. Completion.create and acreate on the same
endpoint first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.harness import ADMIN_KEY, Appliance

PROMPTS = 100
SCRIPT = textwrap.dedent("""
    import json, sys
    from llmengine import Completion, File
    from llmengine.data_types import (
        CreateBatchCompletionsModelConfig, CreateBatchCompletionsRequestContent)
    step, arg = sys.argv[1], sys.argv[2]
    config = CreateBatchCompletionsModelConfig(model="gemma", labels={"team": "test"})
    if step == "v1":
        content = CreateBatchCompletionsRequestContent(
            prompts=[f"Count: {i}," for i in range(int(arg))], max_new_tokens=2, temperature=0.0)
        made = Completion.batch_create(
            output_data_path="counts.jsonl", model_config=config, content=content)
        print(json.dumps(made.job_id))
    elif step == "v2":
        made = Completion.batch_create(
            output_data_path="cut.jsonl", model_config=config, input_data_path=arg, use_v2=True)
        print(json.dumps(made.job_id))
    elif step in ("v2-chat", "v2-completions"):  # arg: the requests' fields, as JSON
        import llmengine.data_types.batch_completion as bc
        kind = (bc.FilteredChatCompletionV2Request if step == "v2-chat"
                else bc.FilteredCompletionV2Request)
        made = Completion.batch_create(
            output_data_path=f"{step}.jsonl",
            model_config=bc.CreateBatchCompletionsV2ModelConfig(model="gemma"),
            use_v2=True, labels={"team": "ml", "product": "p"},
            content=[kind(**fields) for fields in json.loads(arg)])
        print(json.dumps(made.job_id))
    elif step == "upload":
        print(json.dumps(File.upload(open(arg, "rb")).id))
    elif step == "wait":  # polled here, in one interpreter: the job once it has a status,
        import time       # or once `completed>=N` of its prompts are done
        want, deadline = sys.argv[3], time.monotonic() + float(sys.argv[4])
        def done(job):
            if want.startswith("completed>="):
                return int(job["metadata"]["completed"]) >= int(want.split(">=")[1])
            return job["status"] == want
        while not done(job := Completion.get_batch_completion(arg)["job"]):
            if time.monotonic() > deadline:
                sys.exit(f"timed out waiting for {want}; last: {job}")
            time.sleep(0.5)
        print(json.dumps(job))
    elif step == "cancel":
        print(json.dumps(Completion.cancel_batch_completion(arg)))
    elif step == "complete":
        import asyncio
        sync = Completion.create(model="gemma", prompt="One, two,", max_new_tokens=3,
                                 temperature=0.0)
        later = asyncio.run(Completion.acreate(model="gemma", prompt="One, two,",
                                               max_new_tokens=3, temperature=0.0))
        print(json.dumps([sync.output.text, later.output.text]))
    elif step == "download":
        print(json.dumps(File.download(arg).content))
""")


def client(appliance: Appliance, step: str, *args: str) -> Any:
    env = {
        **os.environ,
        "LLM_ENGINE_BASE_PATH": appliance.url + "/",
        "SCALE_API_KEY": ADMIN_KEY,
        "LLM_ENGINE_DISABLE_VERSION_CHECK": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, step, *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def outputs(appliance: Appliance, job: dict[str, Any]) -> list[dict[str, Any]]:
    content = client(appliance, "download", job["metadata"]["output_file_id"])
    return [json.loads(line) for line in content.splitlines()]


def test_batch_completions_run_in_order_and_cancel_keeps_finished(
    appliance: Appliance, tmp_path: Path
) -> None:
    appliance.start_role("worker")
    admin = appliance.client()
    create_gemma(admin, "gemma", per_worker=4)
    wait_ready(admin, "gemma")
    sync, later = client(appliance, "complete", "")  # Completion.create and acreate
    assert sync and sync == later  # greedy: the same words both ways

    job_id = client(appliance, "v1", str(PROMPTS))
    job = client(appliance, "wait", job_id, "completed", "420")
    assert job["metadata"]["completed"] == str(PROMPTS)
    lines = outputs(appliance, job)
    assert [line["custom_id"] for line in lines] == [str(i) for i in range(PROMPTS)]
    for line in lines:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["text"]
    named = admin.get(f"/v1/files/{job['metadata']['output_file_id']}").json()
    assert named["filename"] == "counts.jsonl"

    source = tmp_path / "prompts.json"
    prompts = [f"Write a long story number {i}:" for i in range(PROMPTS)]
    source.write_text(json.dumps({"prompts": prompts, "max_new_tokens": 24, "temperature": 0}))
    cut_id = client(appliance, "v2", client(appliance, "upload", str(source)))
    client(appliance, "wait", cut_id, "completed>=3", "300")
    assert client(appliance, "cancel", cut_id) == {"success": True}
    cut = client(appliance, "wait", cut_id, "cancelled", "120")
    kept = outputs(appliance, cut)
    assert 3 <= len(kept) < PROMPTS
    indexes = [int(line["custom_id"]) for line in kept]
    assert indexes == sorted(indexes)
    assert all(line["response"]["status_code"] == 200 for line in kept)
    assert client(appliance, "cancel", cut_id) == {"success": False}


def test_v2_chat_requests_from_the_client_reach_the_replica_without_its_nulls(
    appliance: Appliance,
) -> None:
    """The client sends every unset field as null (`"name": null` in each message, `detail`
    and the like in content parts); llama.cpp refuses a null name with a 500, vLLM with a
    400. LLM Engine sends on only the set fields, and so does the appliance."""
    appliance.start_role("worker")
    admin = appliance.client()
    create_gemma(admin, "gemma", per_worker=2)
    wait_ready(admin, "gemma")
    requests = [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            ],
            "max_tokens": 5,
            "temperature": 0,
        },
    ]
    job_id = client(appliance, "v2-chat", json.dumps(requests))
    job = client(appliance, "wait", job_id, "completed", "120")
    assert (job["metadata"]["completed"], job["metadata"]["failed"]) == ("2", "0"), job
    lines = outputs(appliance, job)
    assert [line["custom_id"] for line in lines] == ["0", "1"]
    for line in lines:
        assert line["response"]["status_code"] == 200, line
        assert line["response"]["body"]["choices"][0]["message"]["content"]
