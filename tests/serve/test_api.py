"""The OpenAI API of `minillm serve`, driven by the official `openai` client against the real
uvicorn server on localhost: completions and chat, streamed and not, equal to what
minillm.torch.generate gives for the same prompt alone; 16 concurrent clients; n and seed; the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from minillm.tokenizer import chat as template
from minillm.tokenizer.stream import special_ids
from tests.serve.conftest import CORPUS, greedy_reference

openai = pytest.importorskip("openai", reason="needs the openai client (the `serve` extra)")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def completion_text(client, prompt: str, max_tokens: int, stream: bool, model: str = "tiny"):
    """(text, number of chunks) of a temperature-0 completion."""
    if not stream:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text, 1
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True))
    return "".join(c.choices[0].text for c in chunks), len(chunks)


def chat_text(client, messages: list[dict], max_tokens: int, stream: bool) -> str:
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                           temperature=0)
        return r.choices[0].message.content
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and list(health["models"]) == ["tiny"]
    stats = health["models"]["tiny"]
    assert (stats["max_batch"], stats["free_slots"], stats["waiting"], stats["max_queue"]) == (4, 4, 0, 64)
    assert httpx.get(server[0] + "/").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_completion_at_temperature_0_is_generate_greedy(client, loaded, stream):
    _, tokenizer = loaded
    prompt = "Anne sees the"
    ids = tokenizer.encode(prompt)
    text, chunks = completion_text(client, prompt, 40, stream)
    assert text == greedy_reference(loaded, ids, 40, special_ids(tokenizer, "eos")) and text
    if stream:
        assert chunks > 10  # token by token, not one piece at the end
    else:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 40
        assert r.usage.total_tokens == len(ids) + 40 and r.choices[0].finish_reason == "length"


def test_completion_equals_the_sample_command(client, run_dir, capsys):
    """The acceptance check as the issue words it: `minillm sample` greedy prints the same text."""
    from minillm.cli import main as cli

    assert cli(["sample", "--run", str(run_dir), "--prompt", "Cleo sees", "--temperature", "0",
                "--max-new-tokens", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed == "Cleo sees" + completion_text(client, "Cleo sees", 50, stream=True)[0] + "\n"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_at_temperature_0_is_generate_greedy(client, loaded, stream):
    _, tokenizer = loaded
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where?"},
                {"role": "assistant", "content": "By the sea."}, {"role": "user", "content": "Who sees it?"}]
    ids = template.render(tokenizer, messages, add_generation_prompt=True)
    expected = greedy_reference(loaded, ids, 30, template.stop_token_ids(tokenizer),
                                template.stop_strings(tokenizer))
    assert chat_text(client, messages, 30, stream) == expected


def test_chat_stream_chunks_follow_openai_format(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"][0]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5


def test_16_concurrent_clients_equal_their_single_answers(client, loaded):
    """16 clients at once through 4 rows (so most join while others are mid-flight), different
    prompt lengths and max_tokens, half streaming: each text equals generate() for it alone."""
    _, tokenizer = loaded
    lines = CORPUS.splitlines()
    jobs = [(" ".join(lines[5 * i:5 * i + 2])[: 3 + 9 * i], 4 + (11 * i) % 37, i % 2 == 1) for i in range(16)]

    def ask(job):
        prompt, max_tokens, stream = job
        time.sleep(0.02 * (jobs.index(job) % 4))  # staggered arrivals
        return completion_text(client, prompt, max_tokens, stream)[0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    eos = special_ids(tokenizer, "eos")
    for (prompt, max_tokens, _), answer in zip(jobs, answers):
        assert answer == greedy_reference(loaded, tokenizer.encode(prompt), max_tokens, eos), prompt


def test_n_choices_are_seeded_one_by_one_and_stop_strings_cut(client, loaded):
    """n=3 with a seed: choice i is what generate gives with seed + i (as `sample --num-samples`)."""
    _, tokenizer = loaded
    r = client.completions.create(model="tiny", prompt="Cleo sees the", max_tokens=40, temperature=1.0,
                                  top_p=0.95, seed=11, n=3, stop=["."])
    ids, eos = tokenizer.encode("Cleo sees the"), special_ids(tokenizer, "eos")
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == [greedy_reference(loaded, ids, 40, eos, ["."], 1.0, 0.95, 11 + i) for i in range(3)]
    assert len(set(texts)) > 1 and all("." not in t for t in texts), texts
    assert {c.finish_reason for c in r.choices} == {"stop"}


def test_two_models_one_with_a_lora_adapter(run_dir, loaded, tmp_path):
    """One server, two model ids: the run as it is, and the run with a LoRA adapter merged in
    (create_app(adapters=...)). Each greedy text is generate()'s on its own load_for_inference(run,
    adapter) (what `sample --adapter` runs), and the two differ."""
    from minillm.serve.app import create_app, run_in_thread
    from minillm.torch import lora
    from minillm.torch.sft import load_for_inference

    model, tokenizer = load_for_inference(run_dir)
    lora.add_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))  # B starts at zero: make the adapter change something
    lora.save_adapter(model, tmp_path / "adapter")
    app = create_app({"base": str(run_dir), "tuned": str(run_dir)}, max_batch=2,
                     adapters={"tuned": str(tmp_path / "adapter")})
    base_url, stop = run_in_thread(app)
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", "tuned"]
        base, tuned = (completion_text(client, "Anne sees", 30, False, m)[0] for m in ("base", "tuned"))
    finally:
        stop()
    ids, eos = tokenizer.encode("Anne sees"), special_ids(tokenizer, "eos")
    assert tuned == greedy_reference(load_for_inference(run_dir, tmp_path / "adapter"), ids, 30, eos)
    assert base == greedy_reference(loaded, ids, 30, eos) != tuned


def test_a_quantized_run_is_served_as_sample_runs_it(run_dir, tmp_path):
    """`minillm quantize` output loads in the server as in `sample`: its greedy text is generate()'s
    on load_for_inference of the quantized run (integer layers, the packed decoder)."""
    from minillm.cli import main as cli
    from minillm.serve.app import create_app, run_in_thread
    from minillm.torch.sft import load_for_inference

    assert cli(["quantize", "--run", str(run_dir), "--method", "int8", "--out", str(tmp_path / "q8")]) == 0
    app = create_app({"q8": str(tmp_path / "q8")}, max_batch=2)
    base_url, stop = run_in_thread(app)
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0)
        text = completion_text(client, "Anne sees", 30, False, "q8")[0]
    finally:
        stop()
    quantized = load_for_inference(tmp_path / "q8")
    assert any(type(m).__name__ == "Int8Linear" for m in quantized[0].modules())  # integer layers
    ids, eos = quantized[1].encode("Anne sees"), special_ids(quantized[1], "eos")
    assert text == greedy_reference(quantized, ids, 30, eos)


def test_cli_serves_until_interrupted(run_dir, tmp_path):
    """`minillm serve` prints its URL when ready, wants the key of MINILLM_API_KEY, stops on Ctrl-C."""
    env = {**os.environ, "MINILLM_API_KEY": "sesame", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minillm.cli", "serve", "--run", f"mini={run_dir}",
                             "--port", "0", "--max-batch", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("minillm serve: listening on http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split()[4]
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sesame"}).json()
        assert [m["id"] for m in models["data"]] == ["mini"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("args, needle", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--run", "a=x", "--run", "a=y"], "the model id 'a' is already taken"),
    (["--adapter", "z=ad"], "'z' not a --run model id"),
    (["--run", "b=y", "--adapter", "ad"], "with several --run, name the model"),
])
def test_cli_bad_options_are_one_line_errors(capsys, args, needle):
    from tests.torch.conftest import one_line_error

    one_line_error(capsys, ["serve", "--run", "x", *args], needle)


def reference_logprobs(loaded, ids: list[int], new: list[int]) -> torch.Tensor:
    """log_softmax of the plain Transformer.forward (no cache, no packing) before each new token:
    (len(new), V), in float64."""
    model, _ = loaded
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1:-1]  # (len(new), V)
    return torch.log_softmax(logits.double(), dim=-1)


def test_logprobs_are_the_models_log_probabilities(client, loaded):
    """Completions (logprobs=3) and chat (logprobs, top_logprobs=2): each token's logprob and the top
    ones equal log_softmax of Transformer.forward over the prompt and the tokens before it."""
    _, tokenizer = loaded
    r = client.completions.create(model="tiny", prompt="Bob sees", max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids, new = tokenizer.encode("Bob sees"), tokenizer.encode("".join(lp.tokens))
    assert "".join(lp.tokens) == r.choices[0].text and len(new) == 12
    ref = reference_logprobs(loaded, ids, new)
    assert lp.token_logprobs == pytest.approx(ref[torch.arange(12), new].tolist(), abs=1e-4)
    for top, row in zip(lp.top_logprobs, ref):
        values, indices = row.topk(3)
        expected = {tokenizer.decode([i]): v for i, v in zip(indices.tolist(), values.tolist())}
        assert top == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == list(range(12))
    messages = [{"role": "user", "content": "Where?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    prompt = template.render(tokenizer, messages, add_generation_prompt=True)
    new = [tokenizer.encode(c.token)[0] for c in content]
    ref = reference_logprobs(loaded, prompt, new)
    assert [c.logprob for c in content] == pytest.approx(ref[torch.arange(len(new)), new].tolist(), abs=1e-4)
    assert [c.top_logprobs[0].token for c in content] == [c.token for c in content]  # greedy: the best one
