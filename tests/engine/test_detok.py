"""Incremental detokenisation gives the text of a full decode, token by token or in bursts."""
import pytest
import torch

from polarsparse.engine.detok import update_text
from polarsparse.engine.sampling import SamplingParams
from polarsparse.engine.sequence import Sequence


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from polarsparse.models.embedded import prepare_default_model

    return AutoTokenizer.from_pretrained(str(prepare_default_model()))


def streams(tokenizer):
    """Random ids (byte-level pieces that split multi-byte characters included), real text with
    emoji/CJK/accents, and special tokens in the middle (skipped by the decode)."""
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, tokenizer.vocab_size, (300,), generator=g).tolist() for _ in range(4)]
    text = "Ünïcödé naïve café — 東京は晴れ 🌧️🙂 x=3; y = f(x)\n\tindent  two  spaces…"
    ids = tokenizer.encode(text, add_special_tokens=False)
    out.append(ids)
    specials = tokenizer.all_special_ids
    out.append(ids[:5] + specials[:2] + ids[5:] + specials[:1])
    return out


@pytest.mark.parametrize("burst", [1, 3, 17])
def test_incremental_text_equals_full_decode(tokenizer, burst):
    for ids in streams(tokenizer):
        seq = Sequence("r", 0, [1], SamplingParams())
        for i in range(0, len(ids), burst):
            seq.output_token_ids.extend(ids[i : i + burst])
            text = update_text(tokenizer, seq)
            full = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            held = len(seq.output_token_ids) - seq.detok_offsets[1]  # tokens whose text waits for a full character
            assert text == full or (held > 0 and full.startswith(text) and full.endswith("\ufffd"))
        assert update_text(tokenizer, seq, final=True) == tokenizer.decode(ids, skip_special_tokens=True)
        prefix_at, read_at = seq.detok_offsets
        assert read_at == len(ids) and read_at - prefix_at <= 4 * burst  # windows stay short


def test_engine_text_and_stop_strings_use_incremental_text(tmp_path):
    """The engine's streamed texts are prefixes of the final text, which is the full decode; a
    stop string that arrives split over two steps still cuts the text."""
    from polarsparse import LLM
    from tests.helpers import add_default_tokenizer, save_tiny

    folder = add_default_tokenizer(save_tiny("llama", tmp_path, vocab_size=49152, num_key_value_heads=2))
    llm = LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=64, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    texts = [o.outputs[0].text for o in llm.stream([5, 6, 7, 8], params)]
    final = llm.generate([[5, 6, 7, 8]], params)[0].outputs[0]
    assert texts[-1] == final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert all(final.text.startswith(t) for t in texts)
    stop = final.text[len(final.text) // 2 : len(final.text) // 2 + 3]
    assert stop and stop in final.text
    cut = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert cut[0].outputs[0].text == final.text[: final.text.index(stop)]
    assert cut[0].outputs[0].finish_reason == "stop"
