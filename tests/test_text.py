"""Prompt encoding equals the stock pipelines', long prompts are reported, and identifiers follow the paper's rule."""

import copy
import dataclasses
import re

import pytest
import torch

from dreambooth_lib.models import build_pipeline
from dreambooth_lib.text import (
    COMMON_SHORT_WORDS,
    PromptEmbeddings,
    PromptTruncatedWarning,
    describe_identifier,
    encode_prompt,
    encode_tokens,
    find_rare_tokens,
    tokenize_prompt,
    truncation_report,
)

PROMPTS = ["a photo of sks dog", "a photo of a dog on the beach, golden hour"]
# 74 one-token words, then a made-up word that BPE splits into several tokens: the 77-token limit falls inside it.
SPLIT_PROMPT = "a " * 74 + "zwxqplorb end"


def pipeline_embeddings(components, prompts, num_images_per_prompt=1):
    """What the stock diffusers pipeline's encode_prompt returns (no classifier-free guidance)."""
    result = build_pipeline(components).encode_prompt(
        prompts, device="cpu", num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=False
    )
    return (result[0], None) if components.kind == "sd" else (result[0], result[2])


# --------------------------------------------------------------------------------------------------------------------
# Encoding


def test_sd_encoding_has_unet_shape_and_equals_pipeline(tiny_sd):
    embeddings = encode_prompt(tiny_sd, PROMPTS)
    expected, _ = pipeline_embeddings(tiny_sd, PROMPTS)
    assert embeddings.embeds.shape == (2, 77, 32)
    assert embeddings.pooled is None
    assert torch.equal(embeddings.embeds, expected)
    # Different prompts give different embeddings (the encoder really reads the ids).
    assert not torch.allclose(embeddings.embeds[0], embeddings.embeds[1])


def test_sdxl_encoding_concatenates_both_encoders_and_equals_pipeline(tiny_sdxl):
    embeddings = encode_prompt(tiny_sdxl, PROMPTS)
    expected, expected_pooled = pipeline_embeddings(tiny_sdxl, PROMPTS)
    assert embeddings.embeds.shape == (2, 77, 32 + 64)
    assert embeddings.pooled.shape == (2, 32)
    assert torch.equal(embeddings.embeds, expected)
    assert torch.equal(embeddings.pooled, expected_pooled)


def test_repeat_orders_like_num_images_per_prompt(tiny_sdxl):
    repeated = encode_prompt(tiny_sdxl, PROMPTS).repeat(3)
    expected, expected_pooled = pipeline_embeddings(tiny_sdxl, PROMPTS, num_images_per_prompt=3)
    assert repeated.batch_size == 6
    assert torch.equal(repeated.embeds, expected)
    assert torch.equal(repeated.pooled, expected_pooled)


def test_cat_puts_batches_in_order_and_to_changes_dtype(tiny_sdxl):
    first, second = encode_prompt(tiny_sdxl, PROMPTS[0]), encode_prompt(tiny_sdxl, PROMPTS[1])
    joined = PromptEmbeddings.cat([first, second]).to(dtype=torch.float64)
    assert joined.embeds.dtype == joined.pooled.dtype == torch.float64
    assert torch.equal(joined.embeds[1].float(), second.embeds[0])
    assert torch.equal(joined.pooled[0].float(), first.pooled[0])
    with pytest.raises(ValueError, match="pooled"):
        PromptEmbeddings.cat([first, PromptEmbeddings(first.embeds)])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_encode_tokens_keeps_gradients_for_a_trained_text_encoder(kind, tiny_sd, tiny_sdxl):
    base = tiny_sd if kind == "sd" else tiny_sdxl
    encoders = [copy.deepcopy(encoder).requires_grad_(True) for encoder in base.text_encoders]
    components = dataclasses.replace(base, text_encoder=encoders[0], text_encoder_2=(encoders + [None])[1])
    embeddings = encode_tokens(components, tokenize_prompt(components, PROMPTS))
    loss = embeddings.embeds.square().mean() + (0 if embeddings.pooled is None else embeddings.pooled.square().mean())
    loss.backward()
    for encoder in encoders:
        grad = encoder.get_input_embeddings().weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # encode_prompt is for frozen use: no graph even though the encoders require grad.
    assert not encode_prompt(components, PROMPTS).embeds.requires_grad


def test_encode_tokens_refuses_ids_for_the_wrong_number_of_encoders(tiny_sd, tiny_sdxl):
    with pytest.raises(ValueError, match="2 text encoder"):
        encode_tokens(tiny_sdxl, tokenize_prompt(tiny_sd, PROMPTS))


# --------------------------------------------------------------------------------------------------------------------
# Truncation


def test_prompt_of_exactly_75_tokens_fits_and_76_is_cut(tiny_sd):
    assert truncation_report(tiny_sd.tokenizer, "a " * 75) is None
    report = truncation_report(tiny_sd.tokenizer, "a " * 75 + "dog")
    assert report.num_tokens == 78 and report.max_tokens == 77
    assert report.cut_words == ["dog"]
    assert report.split_word is None


def test_truncation_names_cut_words_and_the_word_split_by_the_limit(tiny_sd):
    report = truncation_report(tiny_sd.tokenizer, SPLIT_PROMPT)
    assert report.cut_words == ["zwxqplorb", "end"]
    assert report.split_word == "zwxqplorb"
    kept_piece = report.kept_text.split()[-1]
    assert "zwxqplorb".startswith(kept_piece) and 0 < len(kept_piece) < len("zwxqplorb")
    # The kept text is exactly what the 77 kept ids decode to.
    with pytest.warns(PromptTruncatedWarning):
        kept_ids = tokenize_prompt(tiny_sd, SPLIT_PROMPT)[0][0, 1:-1]
    assert tiny_sd.tokenizer.decode(kept_ids).replace(" ", "") == report.kept_text.replace(" ", "")
    assert "'zwxqplorb' is cut inside" in report.message()


def test_punctuation_cut_from_a_kept_word_is_reported(tiny_sd):
    report = truncation_report(tiny_sd.tokenizer, "a " * 74 + "Dog, on grass")
    assert report.cut_words == ["Dog,", "on", "grass"]
    assert report.split_word == "Dog,"
    assert report.cut_text == ", on grass"


def test_tokenize_prompt_warns_once_per_truncated_prompt_and_pads_each_tokenizer(tiny_sdxl):
    with pytest.warns(PromptTruncatedWarning, match=re.escape("Words cut: 'zwxqplorb', 'end'")) as caught:
        ids = tokenize_prompt(tiny_sdxl, [SPLIT_PROMPT, PROMPTS[0]])
    assert len([w for w in caught if issubclass(w.category, PromptTruncatedWarning)]) == 1
    assert [tuple(i.shape) for i in ids] == [(2, 77), (2, 77)]
    end = tiny_sdxl.tokenizer.eos_token_id
    assert ids[0][0, -1] == ids[1][0, -1] == end  # the long prompt is cut, then closed with the end token
    # The short prompt is padded: with the end token by tokenizer 1, with "!" by SDXL's tokenizer 2.
    assert ids[0][1, -1] == end
    assert ids[1][1, -1] == tiny_sdxl.tokenizer_2.convert_tokens_to_ids("!") != end


def test_short_prompts_tokenize_without_warning(tiny_sd, recwarn):
    tokenize_prompt(tiny_sd, PROMPTS)
    assert not [w for w in recwarn if issubclass(w.category, PromptTruncatedWarning)]


# --------------------------------------------------------------------------------------------------------------------
# Identifiers


def test_rare_tokens_are_short_single_rare_uncommon_words(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    found = find_rare_tokens(tokenizer, count=20, seed=0)
    assert len({token.word for token in found}) == 20
    for token in found:
        assert tokenizer(token.word, add_special_tokens=False).input_ids == [token.token_id]
        assert tokenizer.convert_ids_to_tokens(token.token_id) == token.word + "</w>"
        assert re.fullmatch("[a-z]{1,3}", token.word) and token.word not in COMMON_SHORT_WORDS
        assert token.token_id >= 0.75 * len(tokenizer)


def test_rare_tokens_are_stable_under_a_seed_and_differ_across_seeds(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    assert find_rare_tokens(tokenizer, 8, seed=3) == find_rare_tokens(tokenizer, 8, seed=3)
    assert find_rare_tokens(tokenizer, 8, seed=3) != find_rare_tokens(tokenizer, 8, seed=4)


def test_rarest_fraction_narrows_the_search_and_bad_counts_are_refused(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    assert all(t.token_id >= 0.95 * len(tokenizer) for t in find_rare_tokens(tokenizer, 10, rarest_fraction=0.05))
    with pytest.raises(ValueError, match="count=0"):
        find_rare_tokens(tokenizer, 0)
    with pytest.raises(ValueError, match="rarest_fraction"):
        find_rare_tokens(tokenizer, 3, rarest_fraction=0)


def test_sks_is_described_as_a_single_rare_token_with_alternatives(tiny_sd):
    description = describe_identifier(tiny_sd.tokenizer, "sks")
    assert description.single_token and description.token_ids == [48136]
    assert description.tokens == ["sks</w>"]
    assert description.passes_rule and not description.common_word
    assert len(description.alternatives) == 5 and "sks" not in [t.word for t in description.alternatives]
    text = str(description)
    assert "48136" in text and "rifle" in text and description.alternatives[0].word in text


def test_common_and_multi_token_words_are_flagged(tiny_sd):
    dog = describe_identifier(tiny_sd.tokenizer, "dog")
    assert dog.single_token and dog.common_word and not dog.passes_rule
    made_up = describe_identifier(tiny_sd.tokenizer, "zwxqplorb")
    assert not made_up.single_token and not made_up.passes_rule
    assert f"{len(made_up.token_ids)} tokens" in str(made_up)
    with pytest.raises(ValueError, match="one word"):
        describe_identifier(tiny_sd.tokenizer, "sks dog")
