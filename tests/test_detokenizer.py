"""A running sequence's text grows one token at a time: after every token it is the full decode of
the tokens so far, a step never decodes a sequence in full, and stop strings still end exactly
at the token that completes them."""

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import INSTRUCTIONS
from elastic_ray import LLM, SamplingParams
from elastic_ray.engine.detokenizer import IncrementalText
from elastic_ray.models.loading import load
from elastic_ray.outputs import finish

TEXTS = ["the red circle is at the top left , café ☕ naïve 東京 and a blue square .",
         "  two  spaces\tand tabs\nnew line ✓ ok", "what color is the 🟥 square ?"]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (LLaMA's kind: '▁' for spaces, bytes for unknown characters)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator([" ".join(TEXTS)] * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level (demo)", "word-level (synthetic)", "metaspace"])
def tokenizer(request, tiny_llava):
    if request.param == "metaspace":
        return metaspace_tokenizer()
    return load("demo")[1].tokenizer if request.param.startswith("byte") else tiny_llava[1].tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_the_text_after_every_token_is_the_full_decode_of_the_tokens_so_far(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=True).input_ids  # specials (skipped) included
    incremental = IncrementalText(tokenizer)
    assert incremental.stream is not None
    for k, token in enumerate(ids, 1):
        # an unfinished character is held back until its last byte, where a full decode shows U+FFFD
        assert incremental.add(token) == tokenizer.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")


def test_a_step_decodes_no_running_sequence_in_full(tiny_llava, images, monkeypatch):
    llm = LLM(tiny_llava)
    calls = []
    decode = type(llm.tokenizer).decode
    monkeypatch.setattr(type(llm.tokenizer), "decode", lambda self, *a, **k: calls.append(1) or decode(self, *a, **k))
    requests = [{"image": image, "prompt": text} for image, text in zip(images, INSTRUCTIONS)]
    for max_tokens in (4, 32):
        calls.clear()
        outputs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop=["never said"]))
        assert all(len(o.token_ids) == max_tokens for o in outputs)
        assert len(calls) == len(requests)  # one full decode per request, when it finishes, whatever its length


def test_a_stop_string_across_two_tokens_ends_at_the_token_that_completes_it(tiny_llava, images):
    llm = LLM(tiny_llava)
    request = [{"image": images[0], "prompt": INSTRUCTIONS[0]}]
    free = llm.generate(request, SamplingParams(max_tokens=16, ignore_eos=True))[0]
    words = free.text.split()
    stop = f"{words[3][-1]} {words[4][0]}"  # the end of one token, a space, the start of the next
    cut = llm.generate(request, SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    sampling = SamplingParams(max_tokens=16, stop=[stop])
    expected_ids, expected_text, reason = finish(llm.tokenizer, free.token_ids, sampling, set())
    assert reason == cut.finish_reason == "stop"
    assert cut.token_ids == expected_ids and cut.text == expected_text == free.text[: free.text.index(stop)].strip()
