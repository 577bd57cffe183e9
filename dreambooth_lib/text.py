"""Prompts to text embeddings, exactly as the stock pipelines compute them, and the choice of the subject identifier.

SD 1.x/2.x condition the UNet on one CLIP text encoder's last hidden state (after its final layer norm). SDXL uses
two encoders: the penultimate hidden states of both, concatenated along the feature axis, and the pooled, projected
output of the second (which joins the size/crop numbers in the UNet's added conditioning). `encode_prompt` here gives
the same tensors as diffusers' `StableDiffusionPipeline.encode_prompt` / `StableDiffusionXLPipeline.encode_prompt`,
but never cuts a long prompt silently, and `encode_tokens` keeps the autograd graph so the text encoder can be trained.

DreamBooth binds the subject to a rare identifier ("a photo of sks dog"); `find_rare_tokens` applies the paper's rule
(Ruiz et al. 2023, sec. 4.1) to the CLIP vocabulary and `describe_identifier` explains a given choice.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from dreambooth_lib.models import Components

# --------------------------------------------------------------------------------------------------------------------
# Embeddings


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on: per-token embeddings [B, 77, D] and, for SDXL only, pooled embeddings [B, P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        """A copy on `device` with floating-point `dtype` (either may be None to keep it)."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return PromptEmbeddings(self.embeds.to(device=device, dtype=dtype), pooled)

    def repeat(self, n: int) -> PromptEmbeddings:
        """Each prompt `n` times in a row: [p0, p0, p1, p1] for n=2 (the order of `num_images_per_prompt`)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0)
        return PromptEmbeddings(self.embeds.repeat_interleave(n, dim=0), pooled)

    @staticmethod
    def cat(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        """Join batches along the batch axis (e.g. instance prompts first, class prompts second)."""
        if not parts:
            raise ValueError("PromptEmbeddings.cat needs at least one PromptEmbeddings.")
        if len({part.pooled is None for part in parts}) > 1:
            raise ValueError("PromptEmbeddings.cat: cannot join SD embeddings (no pooled) with SDXL ones (pooled).")
        pooled = None if parts[0].pooled is None else torch.cat([part.pooled for part in parts])
        return PromptEmbeddings(torch.cat([part.embeds for part in parts]), pooled)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizing, with truncation reported


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder reads; the cut words have no effect on the image."""


@dataclass
class TruncationReport:
    """Which part of a prompt a tokenizer cuts off. Character positions refer to the prompt as written."""

    prompt: str
    max_tokens: int  # the tokenizer's limit, start and end tokens included (77 for CLIP)
    num_tokens: int  # what the whole prompt needs, start and end tokens included
    cut_start: int  # the first character that is lost
    split_word: str | None  # the word cut in the middle, if the limit falls inside one

    @property
    def kept_text(self) -> str:
        return self.prompt[: self.cut_start]

    @property
    def cut_text(self) -> str:
        return self.prompt[self.cut_start :]

    @property
    def cut_words(self) -> list[str]:
        """Every word (as written, split on whitespace) that lost at least part of itself."""
        return [m.group() for m in re.finditer(r"\S+", self.prompt) if m.end() > self.cut_start]

    def message(self) -> str:
        lost = self.num_tokens - self.max_tokens
        text = (
            f"Prompt too long: it needs {self.num_tokens} tokens but the text encoder reads {self.max_tokens} "
            f"(start and end tokens included), so the last {lost} token(s) are ignored. Words cut: "
            f"{', '.join(repr(w) for w in self.cut_words)}."
        )
        if self.split_word is not None:
            kept = self.kept_text.split()[-1]
            text += f" {self.split_word!r} is cut inside: only {kept!r} is read."
        start = self.prompt if len(self.prompt) <= 40 else self.prompt[:40] + "..."
        return text + f" (prompt {start!r}) Shorten it, or move what matters to the front."


def truncation_report(tokenizer: PreTrainedTokenizerBase, prompt: str) -> TruncationReport | None:
    """What `tokenizer` would cut from `prompt` at its `model_max_length`, or None when the whole prompt fits.

    The cut is the one the pipelines make: a start token, the first `model_max_length - 2` prompt tokens, an end token.
    """
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    room = tokenizer.model_max_length - 2  # start-of-text and end-of-text take two places
    if len(encoding.input_ids) <= room:
        return None
    cut_start = encoding["offset_mapping"][room][0]
    # The limit can fall inside a word as written: BPE pieces of one word, or punctuation glued to a kept word.
    inside = [m for m in re.finditer(r"\S+", prompt) if m.start() < cut_start < m.end()]
    split_word = inside[0].group() if inside else None
    return TruncationReport(
        prompt=prompt,
        max_tokens=tokenizer.model_max_length,
        num_tokens=len(encoding.input_ids) + 2,
        cut_start=cut_start,
        split_word=split_word,
    )


def _as_list(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}.")
    return prompts


def tokenize_prompt(components: Components, prompts: str | list[str]) -> list[torch.Tensor]:
    """Token ids for each of the model's tokenizers: a list of one (SD) or two (SDXL) LongTensors [B, 77].

    Padded and truncated as the pipelines do; every truncation is reported with a `PromptTruncatedWarning`.
    """
    prompts = _as_list(prompts)
    messages: list[str] = []
    for tokenizer in components.tokenizers:
        for prompt in prompts:
            report = truncation_report(tokenizer, prompt)
            if report is not None and report.message() not in messages:
                messages.append(report.message())
    for message in messages:
        warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
    return [
        tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in components.tokenizers
    ]


# --------------------------------------------------------------------------------------------------------------------
# Encoding


def encode_tokens(components: Components, input_ids: list[torch.Tensor]) -> PromptEmbeddings:
    """Run the text encoder(s) on token ids from `tokenize_prompt`.

    Autograd is left as the caller has it, so a text encoder that requires grad is trained through these embeddings.
    """
    encoders = components.text_encoders
    if len(input_ids) != len(encoders):
        raise ValueError(
            f"{components.kind} has {len(encoders)} text encoder(s) but {len(input_ids)} id tensor(s) were given: "
            "pass the list that tokenize_prompt returns for the same components."
        )
    if components.kind == "sd":
        (encoder,), (ids,) = encoders, input_ids
        # The pipeline's default (clip_skip=None): the last hidden state, after the final layer norm.
        return PromptEmbeddings(encoder(ids.to(encoder.device))[0])
    outputs = [
        encoder(ids.to(encoder.device), output_hidden_states=True)
        for encoder, ids in zip(encoders, input_ids, strict=True)
    ]
    # SDXL reads the penultimate layer, without the final layer norm (Podell et al. 2023, sec. 2.1), of both encoders.
    embeds = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    # The pooled (end-token) output of the second encoder, through its projection.
    return PromptEmbeddings(embeds, outputs[-1].text_embeds)


def encode_prompt(components: Components, prompts: str | list[str]) -> PromptEmbeddings:
    """Embeddings of `prompts` (no gradients): the tensors the stock pipeline's `encode_prompt` gives for them."""
    input_ids = tokenize_prompt(components, prompts)
    with torch.no_grad():
        return encode_tokens(components, input_ids)


# --------------------------------------------------------------------------------------------------------------------
# The subject identifier

# Ordinary short English words: the model already knows them, so they are poor identifiers (paper sec. 4.1).
_COMMON_SHORT_WORDS = """
    a i o am an as at be by do go he hi if in is it me my no of oh ok on or ox so to up us we ye yo
    ace act add ado aft age ago aid aim air ale all alp and ant any ape apt arc are ark arm art ash ask ate awe awk
    axe aye bad bag ban bar bat bay bed bee beg bet bib bid big bin bit boa bob bog boo bow box boy bra bro bud bug bum
    bun bus but buy bye cab cam can cap car cat cob cod cog con cop cot cow coy cry cub cud cue cup cur cut dab dad dam
    day den dew did die dig dim din dip doe dog don dot dry dub dud due dug dun duo dye ear eat ebb eel egg ego elf elk
    elm emu end eon era eve ewe eye fab fad fan far fat fax fed fee few fez fib fig fin fir fit fix flu fly fob foe fog
    for fox fro fry fun fur gab gag gal gap gas gel gem get gig gin god got gum gun gut guy gym had hag ham has hat hay
    hem hen her hew hey hid him hip his hit hob hog hop hot how hub hue hug hum hut ice icy ill imp ink inn ion ire irk
    its ivy jab jam jar jaw jay jet jig job jog jot joy jug keg key kid kin kit lab lad lag lap law lax lay led leg let
    lid lie lip lit lob log lot low lox mad man map mat maw may men met mew mid mix mob mom mop mud mug mum nab nag nap
    net new nib nil nip nit nod nor not now nun nut oak oar oat odd ode off oft oil old one opt orb ore our out owe owl
    own pad pal pan pap par pat paw pay pea peg pen pep per pet pew pie pig pin pit ply pod pop pot pox pry pub pug pun
    pup pus put rag ram ran rap rat raw ray red rib rid rig rim rip rob rod roe rot row rub rug rum run rut rye sad sag
    sap sat saw say sea see set sew she shy sin sip sir sis sit six ski sky sly sob sod son sow soy spa spy sty sub sue
    sum sun sup tab tad tag tan tap tar tax tea tee ten the tic tie tin tip toe ton too top tot tow toy try tub tug tux
    two urn use van vat vet vex via vie vow wad wag war was wax way web wed wee wet who why wig win wit woe wok won woo
    wow wry yak yam yap yaw yea yes yet yew you zap zen zip zit zoo
"""
COMMON_SHORT_WORDS = frozenset(_COMMON_SHORT_WORDS.split())
# Offensive or vulgar tokens that happen to pass the rule: never suggested to a class.
OFFENSIVE_SHORT_TOKENS = frozenset({"fag", "fck", "dik", "jap", "kkk", "nig", "wtf", "fuk", "fuc", "cum", "sex", "xxx"})

RARE_TOKEN_RULE = (
    "DreamBooth (Ruiz et al. 2023, sec. 4.1) names the subject with an identifier that is a rare token of the "
    "vocabulary: short, read as a single token, with a weak prior, so fine-tuning gives it a meaning instead of "
    "fighting the one it has (an ordinary word like 'dog' would blend the subject with every dog). Here that means: "
    "whole-word CLIP tokens of 1-3 letters, in the last part of the BPE vocabulary (high ids are late, rare merges), "
    "that are not common English words."
)

# The part of the BPE vocabulary searched by default: the last quarter, merged late because rare in CLIP's captions.
RAREST_FRACTION = 0.25

# Notes on identifiers that tutorials use often.
KNOWN_IDENTIFIERS = {
    "sks": (
        "'sks' is the identifier of the diffusers DreamBooth example ('a photo of sks dog') and so of many tutorials: "
        "it is a single, late (rare) CLIP token of three letters. Its prior is weak but not empty: SKS is also the "
        "name of a rifle, and captions in that context taught the text encoder something about it, which can leak "
        "into images early in training. Any token that passes the same rule works as well."
    ),
}


@dataclass(frozen=True)
class RareToken:
    """A candidate identifier: the word to type in prompts and the single CLIP token it becomes."""

    word: str
    token_id: int
    vocab_size: int

    @property
    def rarity(self) -> float:
        """Position in the BPE vocabulary, 0 (first merge, most frequent) to 1 (last merge, rarest)."""
        return self.token_id / self.vocab_size

    def explain(self) -> str:
        return (
            f"{self.word!r}: one token (id {self.token_id}, in the rarest {1 - self.rarity:.1%} of the vocabulary), "
            f"{len(self.word)} letter(s), not a common word"
        )


def _single_token_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _rare_candidates(tokenizer: PreTrainedTokenizerBase, rarest_fraction: float) -> list[RareToken]:
    """Every token that passes the rule, in id order (so a seeded sample does not depend on dict order)."""
    if not 0 < rarest_fraction <= 1:
        raise ValueError(f"rarest_fraction={rarest_fraction}: use a fraction of the vocabulary in (0, 1].")
    vocab_size = len(tokenizer)
    first_id = int((1 - rarest_fraction) * vocab_size)
    excluded = COMMON_SHORT_WORDS | OFFENSIVE_SHORT_TOKENS
    found = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = token.removesuffix("</w>")  # CLIP's BPE marks the end of a whole word with </w>
        if token_id < first_id or word == token or not re.fullmatch("[a-z]{1,3}", word) or word in excluded:
            continue
        if _single_token_id(tokenizer, word) == token_id:
            found.append(RareToken(word, token_id, vocab_size))
    return found


def find_rare_tokens(
    tokenizer: PreTrainedTokenizerBase, count: int = 10, seed: int = 0, *, rarest_fraction: float = RAREST_FRACTION
) -> list[RareToken]:
    """`count` candidate identifiers drawn (seeded, without repeats) from the tokens that pass `RARE_TOKEN_RULE`.

    Args:
        tokenizer: a CLIP tokenizer (SD's, or either of SDXL's: they share the vocabulary).
        count: how many to return.
        seed: the same seed gives the same list.
        rarest_fraction: search only the last `rarest_fraction` of the vocabulary (the rarest merges).
    """
    candidates = _rare_candidates(tokenizer, rarest_fraction)
    if not 0 < count <= len(candidates):
        raise ValueError(f"count={count}: choose 1 to {len(candidates)} (the tokens that pass the rule).")
    return random.Random(seed).sample(candidates, count)


@dataclass
class IdentifierDescription:
    """How a tokenizer reads a candidate identifier, whether it passes the rare-token rule, and alternatives."""

    word: str
    token_ids: list[int]
    tokens: list[str]
    common_word: bool
    passes_rule: bool  # single whole-word token of 1-3 letters, rare, not a common word (RARE_TOKEN_RULE)
    rarity: float  # of the (first) token: 0 = most frequent merge, 1 = rarest
    alternatives: list[RareToken] = field(default_factory=list)

    @property
    def single_token(self) -> bool:
        return len(self.token_ids) == 1

    def __str__(self) -> str:
        if self.single_token:
            lines = [
                f"{self.word!r} is a single token: {self.tokens[0]!r}, id {self.token_ids[0]} "
                f"(in the rarest {1 - self.rarity:.1%} of the vocabulary)."
            ]
        else:
            lines = [
                f"{self.word!r} is {len(self.token_ids)} tokens {self.tokens} (ids {self.token_ids}): the subject "
                "would be spread over several tokens, each with its own prior."
            ]
        if self.common_word:
            lines.append(f"{self.word!r} is a common word: the model's idea of it will mix with your subject.")
        if self.word.lower() in KNOWN_IDENTIFIERS:
            lines.append(KNOWN_IDENTIFIERS[self.word.lower()])
        lines.append(RARE_TOKEN_RULE)
        lines.append(f"{self.word!r} {'passes' if self.passes_rule else 'does not pass'} this rule.")
        lines.append("Alternatives that pass it: " + "; ".join(token.explain() for token in self.alternatives) + ".")
        return "\n".join(lines)


def describe_identifier(
    tokenizer: PreTrainedTokenizerBase, word: str, *, alternatives: int = 5, seed: int = 0
) -> IdentifierDescription:
    """Explain `word` as a DreamBooth identifier (`print` the result), with `alternatives` rare tokens to use."""
    if not word.strip() or len(word.split()) != 1:
        raise ValueError(f"word={word!r}: give one word without spaces, e.g. 'sks'.")
    token_ids = tokenizer(word, add_special_tokens=False).input_ids
    others = [token for token in find_rare_tokens(tokenizer, alternatives + 1, seed) if token.word != word.lower()]
    return IdentifierDescription(
        word=word,
        token_ids=token_ids,
        tokens=tokenizer.convert_ids_to_tokens(token_ids),
        common_word=word.lower() in COMMON_SHORT_WORDS,
        passes_rule=any(token.word == word.lower() for token in _rare_candidates(tokenizer, RAREST_FRACTION)),
        rarity=token_ids[0] / len(tokenizer),
        alternatives=others[:alternatives],
    )
