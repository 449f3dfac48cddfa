"""The protocols RL trainers speak, each against a running `serve`: OpenRLHF's /get_reward as its
client calls it, vLLM's pooling API (/classify, /v1/classify, /pooling, /v1/models) in the shapes of
vLLM's protocol files, the API key, and one error shape for unknown routes and methods."""

import asyncio
import json
import math
import random
import threading
import time

import httpx
import pytest
from test_serve import chat, metric_values, running, templated, text

from worldpm_lite.scorer import Scorer
from worldpm_lite.serve.app import create_app

CLASSIFY_KEYS = {"id", "object", "created", "model", "data", "usage"}
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}


@pytest.fixture(scope="module")
def scorer(small_dir):
    return Scorer.from_pretrained(small_dir, device="cpu")


@pytest.fixture(scope="module")
def url(scorer):
    with running(create_app(scorer, model="worldpm-small", max_items=8)) as u:
        yield u


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_openrlhf_single_sample_requests_from_every_rollout_merge_into_full_batches(small_dir, scorer):
    """OpenRLHF's client (openrlhf/utils/agent.py) sends one sample per request, from every rollout at once:
    {"query": [q], "prompts": [p], "labels": [l]}. Here 256 such requests are all in the queue before the
    model starts (the worker is held on the first), so how they merge does not depend on timing."""
    rng = random.Random(7)
    prompts = [text(rng, 2, 8) for _ in range(32)]
    samples = [(p, chat(p, text(rng, 2, 25))) for p in prompts for _ in range(8)]
    opened, entered = threading.Event(), threading.Event()
    held = Scorer.from_pretrained(small_dir, device="cpu")
    run = held.run

    taken = []  # requests (one group each) in the worker's first round

    def gated(groups):  # the worker's first round waits here until every other request is queued
        groups = list(groups)
        if not taken:
            taken.append(len(groups))
            entered.set()
            assert opened.wait(600)
        yield from run(groups)
    held.run = gated
    with running(create_app(held, max_wait=0)) as u:
        async def rollouts():
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
            async with httpx.AsyncClient(base_url=u, timeout=180, limits=limits) as c:
                async def one(i):
                    p, conv = samples[i]
                    return await c.post("/get_reward", json={"query": [templated(conv)], "prompts": [p],
                                                             "labels": [{"answer": i, "kind": "any JSON"}]})

                async def release():
                    deadline = time.monotonic() + 600
                    while not (entered.is_set() and metric_values((await c.get("/metrics")).text)[
                            "worldpm_queue_depth"] + taken[0] == len(samples)):
                        assert time.monotonic() < deadline, "the requests did not all reach the queue"
                        await asyncio.sleep(0.05)
                    opened.set()
                return (await asyncio.gather(release(), *(one(i) for i in range(len(samples)))))[1:]

        responses = asyncio.run(rollouts())
        metrics = metric_values(httpx.get(f"{u}/metrics").text)
    assert entered.is_set() and [r.status_code for r in responses] == [200] * len(samples)
    want = scorer.score([conv for _, conv in samples])
    got = [r.json() for r in responses]
    assert [g["rewards"] for g in got] == [[w] for w in want]  # exactly the Scorer's numbers
    assert all(g["scores"] == g["rewards"] and g["extra_logs"] == {} for g in got)  # what OpenRLHF reads next
    tokens = sum(len(ids) for ids in scorer.encode([conv for _, conv in samples]))
    full_rounds = math.ceil(tokens / scorer.token_budget)  # the fewest rounds the token budget allows
    assert metrics["worldpm_batched_requests_sum"] == len(samples)
    assert metrics["worldpm_batched_requests_count"] <= 1 + full_rounds + 1  # the held first round, then full ones


def post(url, path, body, **kw):
    return httpx.post(url + path, content=json.dumps(body), timeout=60, **kw)


def test_vllm_classify_shapes_and_values(url, scorer):
    rng = random.Random(8)
    convs = [chat(text(rng, 2, 8), text(rng, 2, 20)) for _ in range(3)]
    raw = scorer.score(convs)
    texts = [templated(c) for c in convs]
    ids = scorer.encode(convs)
    # verl's reward loop: one templated text, activation off, reads data[-1].probs[-1]
    r = post(url, "/classify", {"model": "worldpm-small", "input": texts[0], "use_activation": False})
    body = r.json()
    assert r.status_code == 200 and set(body) == CLASSIFY_KEYS and body["object"] == "list"
    assert body["id"].startswith("classify-") and isinstance(body["created"], int) and body["model"] == "worldpm-small"
    assert body["data"] == [{"index": 0, "label": "LABEL_0", "probs": [raw[0]], "num_classes": 1}]
    assert set(body["usage"]) == USAGE_KEYS and body["usage"]["prompt_tokens"] == len(ids[0])
    assert body["usage"]["total_tokens"] == len(ids[0]) and body["usage"]["completion_tokens"] == 0
    # every input form; vLLM's default (activation on) is sigmoid for one class; /v1/classify is the same
    for path, form in (("/classify", texts), ("/v1/classify", ids), ("/classify", ids[0])):
        got = post(url, path, {"input": form}).json()
        n = len(form) if isinstance(form[0], (str, list)) else 1
        assert [d["probs"] for d in got["data"]] == [[sigmoid(v)] for v in raw[:n]]
        assert [d["index"] for d in got["data"]] == list(range(n))
    # the old switches, when use_activation is absent
    assert post(url, "/classify", {"input": texts[1], "activation": False}).json()["data"][0]["probs"] == [raw[1]]
    assert post(url, "/classify", {"input": texts[1], "softmax": False}).json()["data"][0]["probs"] == [raw[1]]
    # messages go through the checkpoint's chat template, as score does
    got = post(url, "/classify", {"messages": convs[2], "use_activation": False, "add_special_tokens": True,
                                  "user": "rl-run-3"}).json()
    assert got["data"][0]["probs"] == [raw[2]]
    # keep the last N tokens, where the reward is read
    n = len(ids[0]) - 5
    got = post(url, "/classify", {"input": texts[0], "truncate_prompt_tokens": n, "use_activation": False}).json()
    assert got["data"][0]["probs"] == scorer.score_ids([ids[0][-n:]]) and got["usage"]["prompt_tokens"] == n
    # the request id header names the answer, as in vLLM
    r = post(url, "/classify", {"input": texts[0]}, headers={"X-Request-Id": "abc123"})
    assert r.json()["id"] == "classify-abc123"


def test_vllm_pooling_and_models(url, scorer):
    conv = chat("Tips for better sleep?", "Keep a fixed schedule.")
    raw = scorer.score([conv])[0]
    got = post(url, "/pooling", {"input": [templated(conv)], "use_activation": False, "task": "classify"}).json()
    assert set(got) == CLASSIFY_KEYS and got["id"].startswith("pooling-")
    assert got["data"] == [{"index": 0, "object": "pooling", "data": [raw]}]
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert {k: card[k] for k in ("id", "object", "owned_by", "parent", "max_model_len", "root")} == {
        "id": "worldpm-small", "object": "model", "owned_by": "worldpm-lite", "parent": None, "max_model_len": 96,
        "root": "worldpm-small"}
    assert card["permission"][0]["object"] == "model_permission"


def test_pooling_answers_a_reward_per_token_as_vllm_does_for_this_architecture(url, scorer):
    """vLLM serves Qwen2ForRewardModel as a token reward model: /pooling's default task is token_classify,
    one [value] per token (sigmoid unless use_activation is false); clients read the last one, which is
    /classify's value and the Scorer's score, exactly."""
    long = "Tips for better sleep? " * 12  # a prompt long enough to run as its own segment (Scorer.single)
    convs = [chat("Tips for better sleep?", "Keep a fixed schedule."), chat(long, "Dark room.")]
    raw, ids = scorer.score(convs), scorer.encode(convs)
    for task in (None, "token_classify"):
        body = {"input": [templated(c) for c in convs], "use_activation": False} | ({"task": task} if task else {})
        got = post(url, "/pooling", body).json()
        assert [d["index"] for d in got["data"]] == [0, 1] and all(d["object"] == "pooling" for d in got["data"])
        for d, n, want in zip(got["data"], map(len, ids), raw):
            assert len(d["data"]) == n and all(len(v) == 1 for v in d["data"])  # [[r_0], ..., [r_T]]
            assert d["data"][-1][0] == want
        classify = post(url, "/classify", {"input": templated(convs[1]), "use_activation": False}).json()
        assert got["data"][1]["data"][-1][0] == classify["data"][0]["probs"][0]
    on = post(url, "/pooling", {"input": templated(convs[0])}).json()  # vLLM's default: the activation on
    assert on["data"][0]["data"][-1] == [pytest.approx(sigmoid(raw[0]), rel=1e-12)]
    assert all(0 < v[0] < 1 for v in on["data"][0]["data"])
    assert post(url, "/pooling", {"input": "x", "task": "encode"}).json()["error"]["message"].startswith(
        "`encode` task was removed")


def test_the_request_id_names_the_answer_header_first(url):
    body = {"input": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n", "request_id": "r-7"}
    assert post(url, "/pooling", body).json()["id"] == "pooling-r-7"
    assert post(url, "/classify", body).json()["id"] == "classify-r-7"
    assert post(url, "/pooling", body, headers={"X-Request-Id": "h-1"}).json()["id"] == "pooling-h-1"
    assert post(url, "/pooling", body | {"request_id": 5}).json()["error"]["param"] == "request_id"


def test_served_model_names_as_vllms_flag(scorer, tmp_path):
    """A request may name any served name or the --model argument; answers report the first name and never a
    path on disk."""
    path = str(tmp_path / "checkpoints" / "WorldPM-small-gptq4")
    conv = templated(chat("hi", "hello there"))
    with running(create_app(scorer, model=path, served_model_names=("worldpm", "reward"))) as u:
        assert [m["id"] for m in httpx.get(f"{u}/v1/models").json()["data"]] == ["worldpm", "reward"]
        for name in ("worldpm", "reward", path, None):
            r = post(u, "/classify", {"input": conv} | ({"model": name} if name else {}))
            assert r.status_code == 200 and r.json()["model"] == "worldpm"
        assert post(u, "/classify", {"input": conv, "model": "other"}).status_code == 404
        assert httpx.get(f"{u}/health").json()["model"] == "worldpm"
        answers = [httpx.get(f"{u}{p}").text for p in ("/health", "/v1/models", "/metrics")]
        assert not any(str(tmp_path) in a for a in answers)
    with running(create_app(scorer, model=path)) as u:  # by default the folder's name, not its path
        assert httpx.get(f"{u}/v1/models").json()["data"][0]["id"] == "WorldPM-small-gptq4"


VLLM_BAD = [
    ({"input": "x", "model": "gpt-4"}, 404, "NotFoundError", "model", "The model `gpt-4` does not exist."),
    ({}, 400, "BadRequestError", "input", "exactly one of 'input'"),
    ({"input": 5}, 400, "BadRequestError", "input", "expected a string, a list of strings"),
    ({"input": [[1, 2], [10**9]]}, 400, "BadRequestError", "input", "input[1]: token id 1000000000 is outside"),
    ({"input": ["ok", 3]}, 400, "BadRequestError", "input", "input[1]: expected a non-empty list of token ids"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "BadRequestError", "messages", "assistant's reply"),
    ({"input": "x", "use_activation": "yes"}, 400, "BadRequestError", "use_activation", "expected true or false"),
    ({"input": "x", "truncate_prompt_tokens": 0}, 400, "BadRequestError", "truncate_prompt_tokens", "positive"),
    ({"input": "x", "truncate_prompt_tokens": 500}, 400, "BadRequestError", "truncate_prompt_tokens", "96 tokens"),
    ({"input": " ".join(["sleep"] * 200)}, 400, "BadRequestError", "input", "truncate_prompt_tokens"),
    ({"input": ["a"] * 9}, 413, "BadRequestError", None, "9 inputs"),
]


@pytest.mark.parametrize("body,code,kind,param,message", VLLM_BAD, ids=[m[:24] for *_, m in VLLM_BAD])
def test_vllm_errors_take_vllms_shape(url, body, code, kind, param, message):
    r = post(url, "/classify", body)
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert err["type"] == kind and err["param"] == param and message in err["message"], err


def test_pooling_refuses_what_it_does_not_serve(url):
    for body, param in (({"input": "x", "task": "embed"}, "task"), ({"input": "x", "encoding_format": "base64"},
                                                                    "encoding_format")):
        r = post(url, "/pooling", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_unknown_routes_and_methods_get_the_error_object(url):
    r = httpx.get(f"{url}/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found" and "/nope" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/get_reward")
    assert r.status_code == 405 and r.json()["error"] == {"code": 405, "type": "method_not_allowed",
                                                          "message": "GET is not allowed on /get_reward"}
    r = httpx.get(f"{url}/classify")
    assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowed"  # vLLM's shape on its routes


def test_api_key_guards_every_scoring_route(scorer):
    conv = chat("hi", "hello there")
    calls = [("/v1/score", {"messages": conv}), ("/get_reward", {"query": [templated(conv)]}),
             ("/classify", {"input": templated(conv)}), ("/v1/classify", {"input": templated(conv)}),
             ("/pooling", {"input": templated(conv)})]
    with running(create_app(scorer, api_key="s3cret")) as u:
        for path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = post(u, path, body, headers=headers)
                assert r.status_code == 401, (path, headers)
                err = r.json()["error"]
                assert err["code"] == 401 and "API key" in err["message"] and "s3cret" not in r.text
                assert ("param" in err) == (path in ("/classify", "/v1/classify", "/pooling"))  # the route's shape
            assert post(u, path, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert post(u, path, body, headers={"authorization": "bearer s3cret"}).status_code == 200
        assert httpx.get(f"{u}/v1/models").status_code == 401
        assert httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{u}/health").status_code == 200 and httpx.get(f"{u}/metrics").status_code == 200


# What vLLM's own request models serialize to, every field with its default (vLLM 0.34.0, read from its wheel:
# vllm/entrypoints/pooling/base/protocol.py PoolingBasicRequestMixin, CompletionRequestMixin, EncodingRequestMixin,
# EmbedRequestMixin, ClassifyRequestMixin; pooling/pooling/protocol.py PoolingCompletionRequest; the classify
# protocol's ClassificationCompletionRequest), and its response models' fields (PoolingResponse,
# PoolingResponseData, ClassificationResponse, ClassificationData, UsageInfo).
VLLM_BASIC = {"model": None, "user": None, "truncate_prompt_tokens": None, "padding": None, "truncation_side": None,
              "request_id": "0123456789abcdef", "priority": 0, "mm_processor_kwargs": None, "cache_salt": None}
VLLM_POOLING = VLLM_BASIC | {"add_special_tokens": True, "encoding_format": "float", "embed_dtype": "float32",
                             "endianness": "native", "dimensions": None, "use_activation": None, "task": None}
VLLM_CLASSIFY = VLLM_BASIC | {"add_special_tokens": True, "use_activation": None}
RESPONSE_FIELDS = {"id", "object", "created", "model", "data", "usage"}
POOLING_DATA_FIELDS, CLASSIFY_DATA_FIELDS = {"index", "object", "data"}, {"index", "label", "probs", "num_classes"}
USAGE_FIELDS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}


def test_the_bodies_vllms_protocol_classes_build_get_vllms_answers(url, scorer):
    conv = chat("Tips for better sleep?", "Keep a fixed schedule.")
    raw, n = scorer.score([conv])[0], len(scorer.encode([conv])[0])
    pooled = post(url, "/pooling", VLLM_POOLING | {"model": "worldpm-small", "input": [templated(conv)]}).json()
    assert set(pooled) == RESPONSE_FIELDS and pooled["object"] == "list" and pooled["id"] == "pooling-0123456789abcdef"
    assert set(pooled["usage"]) == USAGE_FIELDS and pooled["usage"]["prompt_tokens"] == n
    (item,) = pooled["data"]
    assert set(item) == POOLING_DATA_FIELDS and item["object"] == "pooling" and len(item["data"]) == n
    assert item["data"][-1] == [pytest.approx(sigmoid(raw), rel=1e-12)]  # use_activation None: vLLM's sigmoid
    classified = post(url, "/classify", VLLM_CLASSIFY | {"input": templated(conv), "use_activation": False}).json()
    assert set(classified) == RESPONSE_FIELDS and classified["id"] == "classify-0123456789abcdef"
    (item,) = classified["data"]
    assert set(item) == CLASSIFY_DATA_FIELDS and item["probs"] == [raw] and item["num_classes"] == 1
