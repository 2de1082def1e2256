"""Token-for-token parity with transformers' generate on the same weights (hf.to_transformers)."""

import pytest
import torch

from minillm.torch.generate import generate
from tests.conftest import make_model, random_prompt

transformers = pytest.importorskip("transformers")
from minillm.interop.hf import to_transformers  # noqa: E402

HF_STYLES = ["gpt2", "llama-gqa"]


def hf_generate(hf_model, prompt: list[int], eos: int | None = None, **settings) -> list[int]:
    """transformers' generate with every setting spelled out (no defaults from a model config)."""
    config = transformers.GenerationConfig(
        pad_token_id=0, eos_token_id=eos, bos_token_id=None, min_length=0, min_new_tokens=None,
        no_repeat_ngram_size=0, num_return_sequences=1, use_cache=True, **settings,
    )
    ids = torch.tensor([prompt])  # an explicit mask: transformers would take id 0 (= pad) for padding
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    out = out[0, len(prompt):].tolist()
    if eos is not None and eos in out:  # transformers pads after eos; we stop there
        out = out[: out.index(eos) + 1]
    return out


@pytest.mark.parametrize("style", HF_STYLES)
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_transformers_for_64_tokens(style, seed):
    model = make_model(style, seed=seed, max_seq_len=96)
    hf = to_transformers(model)
    prompt = random_prompt(9, seed=seed)
    ours = generate(model, prompt, 64, temperature=0)
    assert ours == hf_generate(hf, prompt, max_new_tokens=64, do_sample=False)


@pytest.mark.parametrize("style", HF_STYLES)
def test_greedy_with_repetition_penalty_and_eos_matches_transformers(style):
    model = make_model(style, seed=3, max_seq_len=96)
    hf, prompt = to_transformers(model), random_prompt(5, seed=3)
    free = generate(model, prompt, 40, temperature=0, repetition_penalty=1.5)
    eos = free[20]
    ours = generate(model, prompt, 40, temperature=0, repetition_penalty=1.5, stop_token_ids=[eos])
    assert ours[-1] == eos
    assert ours == hf_generate(hf, prompt, eos=eos, max_new_tokens=40, do_sample=False,
                               repetition_penalty=1.5)


def _beam_cases():
    for style in HF_STYLES:
        for early_stopping in (False, True, "never"):
            for length_penalty in (1.0, 0.5, -1.0):
                yield style, early_stopping, length_penalty


@pytest.mark.parametrize("style,early_stopping,length_penalty", list(_beam_cases()))
def test_beam_search_matches_transformers(style, early_stopping, length_penalty):
    model = make_model(style, seed=1, max_seq_len=64)
    hf, prompt = to_transformers(model), random_prompt(7, seed=4)
    greedy = generate(model, prompt, 30, temperature=0)
    for eos in (None, greedy[3]):  # no eos: every beam runs to the length limit; eos: beams end early
        ours = generate(model, prompt, 30, num_beams=4, length_penalty=length_penalty,
                        early_stopping=early_stopping, stop_token_ids=[] if eos is None else [eos])
        theirs = hf_generate(hf, prompt, eos=eos, max_new_tokens=30, do_sample=False, num_beams=4,
                             length_penalty=length_penalty, early_stopping=early_stopping)
        assert ours == theirs, (eos, ours, theirs)
