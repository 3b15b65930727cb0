#!/usr/bin/env python3
"""Drives a running coordinator with clients that are not ours: grpcio with stubs generated
from proto/rrt/v1/generate.proto by grpcio-tools, and the official openai package against the
OpenAI-compatible HTTP API, streaming and not. Every greedy answer must equal the reference
(`rrt generate`) passed in --refs. Run by tests/tests/cluster.rs."""
import argparse
import json
import os
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--grpc", required=True, help="host:port of the coordinator's gRPC service")
ap.add_argument("--http", required=True, help="base URL of the coordinator's HTTP API")
ap.add_argument("--proto", required=True, help="the repository's proto/ directory")
ap.add_argument("--refs", required=True, help="JSON: {'raw:PROMPT' | 'chat:MESSAGE': {ids, text}}")
ap.add_argument("--max-tokens", type=int, default=16)
ap.add_argument("--work", required=True, help="scratch directory for the generated stubs")
a = ap.parse_args()

refs = json.load(open(a.refs))
failures = []


def check(what, got, want):
    if got != want:
        failures.append(f"{what}: got {got!r}, want {want!r}")
    else:
        print(f"ok   {what}")


# --- gRPC with generated stubs ---------------------------------------------------------------
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", f"-I{a.proto}", f"--python_out={a.work}",
     f"--grpc_python_out={a.work}", os.path.join(a.proto, "rrt/v1/generate.proto")],
    check=True,
)
sys.path.insert(0, a.work)
import grpc  # noqa: E402
from rrt.v1 import generate_pb2 as pb  # noqa: E402
from rrt.v1 import generate_pb2_grpc as pb_grpc  # noqa: E402

stub = pb_grpc.GenerationStub(grpc.insecure_channel(a.grpc))
info = stub.ModelInfo(pb.ModelInfoRequest())
check("grpc ModelInfo.loops", info.loops, 1)


def request(key, **kw):
    kind, text = key.split(":", 1)
    r = pb.GenerateRequest(max_new_tokens=a.max_tokens, temperature=0.0, **kw)
    if kind == "raw":
        r.prompt = text
    else:
        r.chat.messages.append(pb.ChatMessage(role="user", content=text))
    return r


for key, want in refs.items():
    r = stub.Generate(request(key))
    check(f"grpc Generate {key} ids", list(r.token_ids), want["ids"])
    check(f"grpc Generate {key} text", r.text, want["text"])
    ids, text, last = [], "", None
    for m in stub.GenerateStream(request(key, logprobs=2)):
        text += m.text
        if m.HasField("token_id"):
            ids.append(m.token_id)
            if len(m.top_logprobs) != 2 or m.top_logprobs[0].token_id != m.token_id:
                failures.append(f"grpc GenerateStream {key}: top_logprobs {m.top_logprobs}")
        if m.finish_reason:
            last = m
    check(f"grpc GenerateStream {key} ids", ids, want["ids"])
    check(f"grpc GenerateStream {key} text", text, want["text"])
    check(f"grpc GenerateStream {key} usage", last.usage.completion_tokens, len(want["ids"]))

try:
    stub.Generate(pb.GenerateRequest(prompt=""))
    failures.append("grpc: an empty prompt was accepted")
except grpc.RpcError as e:
    check("grpc empty prompt code", e.code(), grpc.StatusCode.INVALID_ARGUMENT)
    check("grpc empty prompt names the field", "prompt" in e.details(), True)

# A message that does not decode (invalid UTF-8 in `prompt`): INVALID_ARGUMENT naming the
# field (prost names the oneof, `GenerateRequest.input`).
raw = grpc.insecure_channel(a.grpc).unary_unary(
    "/rrt.v1.Generation/Generate", request_serializer=lambda b: b, response_deserializer=lambda b: b
)
try:
    raw(b"\x0a\x02\xff\xfe")
    failures.append("grpc: invalid UTF-8 was accepted")
except grpc.RpcError as e:
    check("grpc invalid UTF-8 code", e.code(), grpc.StatusCode.INVALID_ARGUMENT)
    check("grpc invalid UTF-8 names the field", "GenerateRequest.input" in e.details(), True)

# --- the official openai client ----------------------------------------------------------------
import openai  # noqa: E402

client = openai.OpenAI(base_url=a.http + "/v1", api_key="unused")
models = [m.id for m in client.models.list()]
check("openai models", len(models) >= 1, True)
model = models[0]
for key, want in refs.items():
    kind, text = key.split(":", 1)
    if kind == "raw":
        r = client.completions.create(model=model, prompt=text, max_tokens=a.max_tokens, temperature=0)
        check(f"openai completions {key}", r.choices[0].text, want["text"])
        check(f"openai completions {key} usage", r.usage.completion_tokens, len(want["ids"]))
        s = client.completions.create(model=model, prompt=text, max_tokens=a.max_tokens, temperature=0,
                                      stream=True)
        check(f"openai completions stream {key}", "".join(c.choices[0].text for c in s if c.choices), want["text"])
    else:
        msgs = [{"role": "user", "content": text}]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=a.max_tokens, temperature=0)
        check(f"openai chat {key}", r.choices[0].message.content, want["text"])
        check(f"openai chat {key} role", r.choices[0].message.role, "assistant")
        s = client.chat.completions.create(model=model, messages=msgs, max_tokens=a.max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for c in s:
            if c.usage:
                usage = c.usage
            for ch in c.choices:
                parts.append(ch.delta.content or "")
        check(f"openai chat stream {key}", "".join(parts), want["text"])
        check(f"openai chat stream {key} usage", usage.completion_tokens if usage else None, len(want["ids"]))
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=3, temperature=0,
                                           logprobs=True, top_logprobs=2)
        lp = r.choices[0].logprobs.content
        check(f"openai chat logprobs {key}", (len(lp), len(lp[0].top_logprobs)), (3, 2))
try:
    client.completions.create(model=model, prompt="x", n=2)
    failures.append("openai: n=2 was accepted")
except openai.BadRequestError as e:
    check("openai n=2 is a 400", e.status_code, 400)
try:
    client.completions.create(model="gpt-4", prompt="x")
    failures.append("openai: an unknown model was accepted")
except openai.NotFoundError as e:
    check("openai unknown model is a 404", e.status_code, 404)

if failures:
    print("\n".join("FAIL " + f for f in failures))
    sys.exit(1)
print("all client checks passed")
