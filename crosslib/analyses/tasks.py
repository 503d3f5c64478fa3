"""Behavioural tasks for circuit tracing: prompts, corrupted prompts, targets and a logit-difference metric.

Four tasks, generated from templates and word lists written for this project and checked
against the tokenizer, so that every target (the token the metric reads) is exactly one token:

``induction_random``
    A sequence A of `induction_length` distinct frequent tokens, then A again. In the second copy
    the next token can be predicted only by looking back at the first copy (an induction head).
``induction_text``
    The same with A a span of natural held-out text (no end-of-text token inside).
``agreement``
    Subject–verb agreement across a distracting phrase whose noun has the other number:
    "The keys to the cabinet" → " are" (correct) vs " is" (wrong).
``ioi``
    Indirect-object identification: "When Mary and John went to the store, John gave a drink to"
    → " Mary" (correct) vs " John" (wrong). Needs names that are single tokens; with a
    vocabulary that has too few of them the task is skipped with a `TaskError` that says so.

The metric
----------
Every task reads logits at some positions of each prompt and compares two tokens there:

    metric = mean over (prompt, read position) of  logit[correct] − logit[wrong]

* agreement, ioi: one read position per prompt, its last token.
* induction: every position p of the second copy that has a successor, i.e. positions
  L .. 2L−2 for copies of length L; correct = the token that followed the same token in the
  first copy, wrong = the token at the same place in the *corrupted* prompt's first copy (a
  frequent token that does not occur in the clean prompt at all). For natural text, read positions
  where the two happen to be equal are left out.

Corrupted prompts (for activation patching) have the same length and swap which answer is
right: agreement flips the subject's number ("The key to the cabinets"), IOI repeats the other
name ("..., Mary gave a drink to" → John), induction replaces the first copy by another sequence
A′ (so the second copy has nothing to copy from). So the metric is positive on clean prompts of
a model that does the task, and near zero or negative on corrupted ones.

Prompts of different lengths are right-padded with the end-of-text token; a causal model's logits
at a real token do not depend on later (padding) tokens, so padding never changes the metric.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Annotated, Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from crosslib.progress import progress as tqdm

from crosslib.config import Config, ParameterError, boolean, fraction, integer, positive_int, require, require_fraction

TASK_NAMES: tuple[str, ...] = ("induction_random", "induction_text", "agreement", "ioi")


class TaskError(ParameterError):
    """A task cannot be built with this tokenizer (a target word is not one token, too few words remain)."""


# --------------------------------------------------------------------------------------------
# Word lists and templates (written for this project; plain, common English)
# --------------------------------------------------------------------------------------------

# (singular, plural); a pair is used only when both forms are single tokens, so that the clean
# and the corrupted prompt (subject number flipped) have the same length.
AGREEMENT_NOUNS: tuple[tuple[str, str], ...] = (
    ("man", "men"), ("woman", "women"), ("child", "children"), ("boy", "boys"), ("girl", "girls"),
    ("friend", "friends"), ("teacher", "teachers"), ("doctor", "doctors"), ("student", "students"),
    ("officer", "officers"), ("farmer", "farmers"), ("king", "kings"), ("dog", "dogs"),
    ("horse", "horses"), ("bird", "birds"), ("house", "houses"), ("car", "cars"), ("book", "books"),
    ("door", "doors"), ("key", "keys"), ("letter", "letters"), ("picture", "pictures"),
    ("table", "tables"), ("window", "windows"), ("road", "roads"), ("tree", "trees"),
    ("report", "reports"), ("plan", "plans"), ("member", "members"), ("city", "cities"),
    ("school", "schools"), ("group", "groups"), ("leader", "leaders"), ("ship", "ships"),
)
# (singular verb, plural verb): the targets.
AGREEMENT_VERBS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"), ("has", "have"))
# {subject} is the noun whose number the verb must match; {attractor} is a noun of the other number.
AGREEMENT_TEMPLATES: tuple[str, ...] = (
    "The {subject} near the {attractor}",
    "The {subject} behind the {attractor}",
    "The {subject} of the {attractor}",
    "The {subject} beside the {attractor}",
    "The {subject} with the {attractor}",
    "The {subject} that the {attractor} saw",
)

IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "James", "Robert", "William", "Thomas", "George", "Henry", "Frank", "Jack",
    "Charles", "Paul", "Peter", "David", "Michael", "Richard", "Joseph", "Edward", "Alice", "Anna",
    "Susan", "Helen", "Sarah", "Kate", "Jane", "Ruth", "Sam", "Tom",
)
IOI_PLACES: tuple[str, ...] = ("store", "park", "school", "market", "station", "garden", "office", "river", "church")
IOI_OBJECTS: tuple[str, ...] = ("drink", "book", "letter", "ring", "bag", "gift", "flower", "coat", "key")
# {name1} and {name2} are the first mentions (in random order), {subject} the repeated name;
# the answer is the other one (the indirect object).
IOI_TEMPLATES: tuple[str, ...] = (
    "When {name1} and {name2} went to the {place}, {subject} gave a {object} to",
    "After {name1} and {name2} arrived at the {place}, {subject} handed a {object} to",
    "While {name1} and {name2} were working at the {place}, {subject} passed a {object} to",
    "Then {name1} and {name2} had a long talk at the {place}. {subject} gave a {object} to",
    "When {name1} and {name2} got a {object} at the {place}, {subject} decided to give it to",
)


# --------------------------------------------------------------------------------------------
# Config and the Task container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskConfig(Config):
    """How a task's prompts are generated.

    n_prompts          prompts per task
    induction_length   tokens per copy in the induction tasks (prompts are twice as long)
    frequent_fraction  random induction tokens are drawn from this most frequent share of the vocabulary
                       (rare tokens barely train, so a small model cannot copy them)
    min_words          fewest usable words (names for IOI, noun pairs for agreement) a task needs
    strict             True: any word or template that breaks the one-token rule is an error;
                       False: it is dropped and listed in `Task.dropped`
    seed               seeds the choice of words, tokens and spans
    """

    n_prompts: Annotated[int, positive_int()] = 64
    induction_length: Annotated[int, integer(2)] = 16
    # the 256 most frequent of the tiny suite's 4096: the pool its mix repeats
    frequent_fraction: Annotated[float, fraction("[0, 1]")] = 0.0625
    min_words: Annotated[int, positive_int()] = 4
    strict: Annotated[bool, boolean()] = False
    seed: Annotated[int, integer(0)] = 0


@dataclasses.dataclass
class Task:
    """A batch of prompts with their targets and the logit-difference metric (see the module docstring).

    clean, corrupted   token ids [prompt, position], right-padded; equal lengths prompt by prompt
    lengths            real (unpadded) length of each prompt
    positions          positions whose logits the metric reads [prompt, target]
    correct, wrong     token ids compared at those positions [prompt, target]
    valid              which (prompt, target) entries count (padding entries are False)
    texts              the clean prompts as text (for display); corrupted_texts likewise
    dropped            words/templates left out because they broke the one-token rule, with why
    """

    name: str
    clean: Int[Tensor, "prompt position"]
    corrupted: Int[Tensor, "prompt position"]
    lengths: Int[Tensor, " prompt"]
    positions: Int[Tensor, "prompt target"]
    correct: Int[Tensor, "prompt target"]
    wrong: Int[Tensor, "prompt target"]
    valid: Bool[Tensor, "prompt target"]
    texts: list[str]
    corrupted_texts: list[str]
    description: str
    tokenizer_name: str
    config: TaskConfig
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_read_positions(self) -> int:
        """How many (prompt, position) logit differences the metric averages."""
        return int(self.valid.sum())

    def token_mask(self) -> Bool[Tensor, "prompt position"]:
        """True at real tokens, False at padding."""
        return torch.arange(self.clean.shape[1])[None, :] < self.lengths[:, None]

    def input_ids(self, corrupted: bool = False) -> Int[Tensor, "prompt position"]:
        return self.corrupted if corrupted else self.clean

    def logit_differences(self, logits: Float[Tensor, "prompt position vocab"],
                          prompts: slice | Tensor = slice(None)) -> Float[Tensor, "prompt target"]:
        """logit[correct] − logit[wrong] at each read position of the prompts `prompts` (0 where not valid)."""
        positions, correct, wrong = self.positions[prompts], self.correct[prompts], self.wrong[prompts]
        valid = self.valid[prompts].to(logits.device)
        rows = torch.arange(positions.shape[0], device=logits.device)[:, None]
        at_read = logits[rows, positions.to(logits.device)]  # [prompt, target, vocab]
        at_read = at_read.to(torch.promote_types(at_read.dtype, torch.float32))  # bf16/fp16 logits: compare in fp32
        difference = (at_read.gather(-1, correct.to(logits.device)[..., None])
                      - at_read.gather(-1, wrong.to(logits.device)[..., None]))[..., 0]
        return torch.where(valid, difference, torch.zeros_like(difference))

    def metric_share(self, logits: Float[Tensor, "prompt position vocab"], prompts: slice | Tensor = slice(None)) -> Tensor:
        """This chunk's share of the metric: the shares of disjoint chunks covering all prompts sum to it.

        (The sum of the chunk's logit differences divided by the task's total number of read positions,
        so gradients computed chunk by chunk add up to the gradient of the full metric.)
        """
        return self.logit_differences(logits, prompts).sum() / max(1, self.n_read_positions)

    def metric(self, logits: Float[Tensor, "prompt position vocab"]) -> Tensor:
        """Mean logit difference over all prompts (logits of every prompt, in order)."""
        require(logits.shape[0] == self.n_prompts, "logits", tuple(logits.shape),
                f"logits for all {self.n_prompts} prompts of the task")
        return self.metric_share(logits)

    def select(self, prompts: Sequence[int] | slice) -> "Task":
        """The task restricted to some prompts (e.g. a few for a quick look)."""
        index = torch.arange(self.n_prompts)[prompts] if isinstance(prompts, slice) else torch.as_tensor(list(prompts))
        keep = index.tolist()
        return dataclasses.replace(
            self, clean=self.clean[index], corrupted=self.corrupted[index], lengths=self.lengths[index],
            positions=self.positions[index], correct=self.correct[index], wrong=self.wrong[index],
            valid=self.valid[index], texts=[self.texts[i] for i in keep],
            corrupted_texts=[self.corrupted_texts[i] for i in keep])

    def to_frame(self, tokenizer: Any = None) -> pd.DataFrame:
        """One row per prompt: texts and (with a tokenizer) the correct and wrong answers of its first read position."""
        frame = pd.DataFrame({"prompt": self.texts, "corrupted": self.corrupted_texts,
                              "length": self.lengths.tolist(), "read_positions": self.valid.sum(1).tolist()})
        if tokenizer is not None:
            frame["correct"] = [tokenizer.decode([t]) for t in self.correct[:, 0].tolist()]
            frame["wrong"] = [tokenizer.decode([t]) for t in self.wrong[:, 0].tolist()]
        return frame


# --------------------------------------------------------------------------------------------
# Tokenizer checks
# --------------------------------------------------------------------------------------------


def tokenizer_name(tokenizer: Any) -> str:
    """A short description of a tokenizer for error messages: where it came from and its size."""
    source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{source!r} ({len(tokenizer)} tokens)"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def single_token(tokenizer: Any, word: str) -> int | None:
    """The id of `word` as it appears after a space (" word") if that is one token, else None."""
    ids = _encode(tokenizer, " " + word)
    return ids[0] if len(ids) == 1 else None


def _target_follows(tokenizer: Any, prompt: str, target: int) -> bool:
    """True when prompt + the target's text tokenizes as the prompt's tokens followed by `target`.

    This is the in-context check: a template ending without a trailing space lets the BPE merge
    the target with the prompt's last characters, which a standalone check would miss.
    """
    text = tokenizer.decode([target])
    return _encode(tokenizer, prompt + text) == _encode(tokenizer, prompt) + [target]


def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def _pad_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else 0


def frequent_tokens(token_stream: np.ndarray, vocab_size: int, fraction: float,
                    exclude: set[int] = frozenset()) -> Int[np.ndarray, " token"]:
    """The most frequent `fraction` of the vocabulary in `token_stream`, most frequent first.

    Tokens that never occur and tokens in `exclude` (special tokens) are left out.
    """
    counts = np.bincount(np.asarray(token_stream, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")
    order = np.array([t for t in order if counts[t] > 0 and int(t) not in exclude], dtype=np.int64)
    return order[: max(2, int(round(fraction * vocab_size)))]


def _check_stream(token_stream: Any, vocab_size: int) -> np.ndarray:
    if token_stream is None:
        raise ParameterError("token_stream=None is not allowed for the induction tasks: pass a 1-D array of token "
                             "ids of held-out text, e.g. crosslib.models.suite.suite_token_streams(suite)['heldout']")
    stream = np.asarray(token_stream)
    require(stream.ndim == 1 and stream.size > 0 and np.issubdtype(stream.dtype, np.integer), "token_stream",
            f"array of shape {stream.shape} and dtype {stream.dtype}", "a non-empty 1-D array of integer token ids")
    require(int(stream.min()) >= 0 and int(stream.max()) < vocab_size, "token_stream",
            f"ids in {int(stream.min())}..{int(stream.max())}", f"ids in 0..{vocab_size - 1} (this tokenizer)")
    return stream


# --------------------------------------------------------------------------------------------
# Assembling prompts into a Task
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Prompt:
    clean: list[int]
    corrupted: list[int]
    positions: list[int]
    correct: list[int]
    wrong: list[int]
    valid: list[bool]


def _assemble(name: str, prompts: list[_Prompt], tokenizer: Any, config: TaskConfig, description: str,
              dropped: dict[str, str]) -> Task:
    pad = _pad_id(tokenizer)
    width = max(len(p.clean) for p in prompts)
    targets = max(len(p.positions) for p in prompts)

    def padded(rows: list[list[Any]], size: int, fill: Any, dtype: torch.dtype) -> Tensor:
        return torch.tensor([list(r) + [fill] * (size - len(r)) for r in rows], dtype=dtype)

    clean = padded([p.clean for p in prompts], width, pad, torch.long)
    corrupted = padded([p.corrupted for p in prompts], width, pad, torch.long)
    return Task(
        name=name, clean=clean, corrupted=corrupted,
        lengths=torch.tensor([len(p.clean) for p in prompts], dtype=torch.long),
        positions=padded([p.positions for p in prompts], targets, 0, torch.long),
        correct=padded([p.correct for p in prompts], targets, pad, torch.long),
        wrong=padded([p.wrong for p in prompts], targets, pad, torch.long),
        valid=padded([p.valid for p in prompts], targets, False, torch.bool),
        texts=[tokenizer.decode(p.clean) for p in prompts],
        corrupted_texts=[tokenizer.decode(p.corrupted) for p in prompts],
        description=description, tokenizer_name=tokenizer_name(tokenizer), config=config, dropped=dropped,
    )


def _keep_single_tokens(words: Sequence[str], tokenizer: Any, config: TaskConfig, what: str,
                        dropped: dict[str, str]) -> dict[str, int]:
    """word -> token id for the words that are one token after a space; the others are dropped (or raise)."""
    kept = {}
    for word in words:
        token = single_token(tokenizer, word)
        if token is None:
            pieces = [tokenizer.decode([t]) for t in _encode(tokenizer, " " + word)]
            reason = f"{what} {' ' + word!r} is {len(pieces)} tokens {pieces} in tokenizer {tokenizer_name(tokenizer)}"
            if config.strict:
                raise TaskError(reason + "; every target must be one token (strict=True)")
            dropped[word] = reason
        else:
            kept[word] = token
    return kept


def _require_enough_words(task: str, usable: Sequence[Any], candidates: str, tokenizer: Any, config: TaskConfig,
                          why: str = "") -> None:
    """Raise `TaskError` (the task is unavailable for this tokenizer) unless at least `config.min_words`
    words are usable, and never fewer than 2: every prompt draws two different ones.
    `candidates` says how many there were and what made one usable."""
    needed = max(2, config.min_words)
    if len(usable) < needed:
        raise TaskError(
            f"the {task} task is not available with tokenizer {tokenizer_name(tokenizer)}: only {len(usable)} of "
            f"{candidates} ({usable}); it needs at least min_words={needed}{why}")


def _check_template(template: str, placeholders: tuple[str, ...], parameter: str) -> None:
    import string

    found = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    require(found == set(placeholders), parameter, template,
            f"a template using exactly the placeholders {['{' + p + '}' for p in placeholders]}")


def _fill_prompts(name: str, draw: Callable[[np.random.Generator], tuple[str, str, str, int, int] | None],
                  templates: Sequence[str], tokenizer: Any, config: TaskConfig, dropped: dict[str, str]) -> list[_Prompt]:
    """Draw `n_prompts` prompts; `draw` returns (template, clean text, corrupted text, correct id, wrong id).

    A template whose prompts break the one-token rule in context (or whose clean and corrupted
    prompts differ in length) is dropped with a reason, or raises in strict mode.
    """
    rng = np.random.default_rng(config.seed)
    broken: set[str] = set()
    prompts: list[tuple[str, _Prompt]] = []
    attempts = 0
    while len(prompts) < config.n_prompts:
        attempts += 1
        if attempts > 50 * config.n_prompts or len(broken) == len(templates):
            raise TaskError(f"the {name} task could not be built with tokenizer {tokenizer_name(tokenizer)}: "
                            f"every template breaks the one-token rule ({sorted(dropped.values())})")
        drawn = draw(rng)
        if drawn is None:
            continue
        template, clean_text, corrupted_text, correct, wrong = drawn
        if template in broken:
            continue
        clean, corrupted = _encode(tokenizer, clean_text), _encode(tokenizer, corrupted_text)
        reason = None
        if not (_target_follows(tokenizer, clean_text, correct) and _target_follows(tokenizer, clean_text, wrong)):
            reason = (f"template {template!r}: in {clean_text!r} the answer {tokenizer.decode([correct])!r} or "
                      f"{tokenizer.decode([wrong])!r} does not follow as one separate token in tokenizer "
                      f"{tokenizer_name(tokenizer)}")
        elif len(clean) != len(corrupted):
            reason = (f"template {template!r}: {clean_text!r} and its corrupted form {corrupted_text!r} have "
                      f"different token counts ({len(clean)} vs {len(corrupted)}) in tokenizer {tokenizer_name(tokenizer)}")
        if reason is not None:
            if config.strict:
                raise TaskError(reason + " (strict=True)")
            broken.add(template)
            dropped[template] = reason
            prompts = [(t, p) for t, p in prompts if t != template]  # its earlier prompts go too
            continue
        last = len(clean) - 1
        prompts.append((template, _Prompt(clean, corrupted, [last], [correct], [wrong], [True])))
    return [p for _, p in prompts]


# --------------------------------------------------------------------------------------------
# The four tasks
# --------------------------------------------------------------------------------------------


def induction_task(tokenizer: Any, token_stream: np.ndarray, config: TaskConfig = TaskConfig(), *,
                   natural: bool = False) -> Task:
    """Repeated sequences: random frequent tokens (``natural=False``) or spans of held-out text.

    `token_stream` is a 1-D array of token ids of held-out text: the frequencies that pick the
    frequent tokens, and the source of the natural spans.
    """
    name = "induction_text" if natural else "induction_random"
    vocab_size = len(tokenizer)
    stream = _check_stream(token_stream, vocab_size)
    rng = np.random.default_rng(config.seed)
    length = config.induction_length
    specials = _special_ids(tokenizer)
    prompts = []
    if not natural:
        pool = frequent_tokens(stream, vocab_size, config.frequent_fraction, specials)
        if len(pool) < 2 * length:
            raise TaskError(
                f"induction_length={length} needs at least {2 * length} distinct frequent tokens, but the top "
                f"frequent_fraction={config.frequent_fraction} of tokenizer {tokenizer_name(tokenizer)} that occur in "
                f"token_stream give {len(pool)}: lower induction_length or raise frequent_fraction")
        for _ in range(config.n_prompts):
            first = rng.choice(pool, size=length, replace=False)  # distinct: each token has one successor
            other = rng.choice(np.setdiff1d(pool, first), size=length, replace=False)
            prompts.append(_induction_prompt(first, other))
        description = (f"random sequences of {length} distinct frequent tokens, repeated; metric = mean over "
                       "second-copy positions of logit(next token of the first copy) − logit(token at that place "
                       "in an unrelated sequence)")
    else:
        is_special = np.isin(stream, list(specials)) if specials else np.zeros(len(stream), dtype=bool)
        starts = np.flatnonzero(np.convolve(is_special.astype(np.int64), np.ones(length, dtype=np.int64), mode="valid") == 0)  # spans without specials
        if len(starts) < 2:
            raise TaskError(f"token_stream has no two spans of induction_length={length} tokens without a special "
                            f"token; use a longer stream or a smaller induction_length")
        for _ in range(config.n_prompts):
            a, b = rng.choice(starts, size=2, replace=False)
            prompts.append(_induction_prompt(stream[a: a + length], stream[b: b + length]))
        if all(not any(p.valid) for p in prompts):
            raise TaskError("every natural-text induction prompt had identical copies and distractors; "
                            "use a longer token_stream")
        description = (f"spans of {length} tokens of held-out text, repeated; metric = mean over second-copy "
                       "positions of logit(next token of the first copy) − logit(token at that place in another span); "
                       "positions where the two tokens coincide are left out")
    return _assemble(name, prompts, tokenizer, config, description, {})


def _induction_prompt(first: np.ndarray, other: np.ndarray) -> _Prompt:
    """[A, A] clean, [A′, A] corrupted; read at second-copy positions L+j, j = 0..L−2."""
    first, other = [int(t) for t in first], [int(t) for t in other]
    length = len(first)
    correct = first[1:]
    wrong = other[1:]
    return _Prompt(clean=first + first, corrupted=other + first,
                   positions=[length + j for j in range(length - 1)],
                   correct=correct, wrong=wrong, valid=[c != w for c, w in zip(correct, wrong)])


def agreement_task(tokenizer: Any, config: TaskConfig = TaskConfig(), *,
                   nouns: Sequence[tuple[str, str]] = AGREEMENT_NOUNS,
                   verbs: Sequence[tuple[str, str]] = AGREEMENT_VERBS,
                   templates: Sequence[str] = AGREEMENT_TEMPLATES) -> Task:
    """Subject–verb agreement across a phrase whose noun has the other number ("The keys to the cabinet" → are)."""
    for template in templates:
        _check_template(template, ("subject", "attractor"), "templates")
    dropped: dict[str, str] = {}
    verb_ids = _keep_single_tokens([v for pair in verbs for v in pair], tokenizer, config, "verb", dropped)
    verb_pairs = [pair for pair in verbs if pair[0] in verb_ids and pair[1] in verb_ids]
    if not verb_pairs:
        raise TaskError(f"the agreement task is not available with tokenizer {tokenizer_name(tokenizer)}: none of "
                        f"the verb pairs {list(verbs)} has both forms as single tokens ({sorted(dropped.values())})")
    noun_ids = _keep_single_tokens([n for pair in nouns for n in pair], tokenizer, config, "noun", dropped)
    noun_pairs = [pair for pair in nouns if pair[0] in noun_ids and pair[1] in noun_ids]
    _require_enough_words("agreement", noun_pairs, f"{len(nouns)} noun pairs have both forms as single tokens",
                          tokenizer, config)

    def draw(rng: np.random.Generator):
        template = templates[rng.integers(len(templates))]
        subject, attractor = (noun_pairs[i] for i in rng.choice(len(noun_pairs), size=2, replace=False))
        number = int(rng.integers(2))  # 0 singular subject, 1 plural
        verb = verb_pairs[rng.integers(len(verb_pairs))]
        clean = template.format(subject=subject[number], attractor=attractor[1 - number])
        corrupted = template.format(subject=subject[1 - number], attractor=attractor[1 - number])
        return template, clean, corrupted, verb_ids[verb[number]], verb_ids[verb[1 - number]]

    prompts = _fill_prompts("agreement", draw, templates, tokenizer, config, dropped)
    description = ("subject–verb agreement across a distracting phrase with a noun of the other number; metric = "
                   "logit(verb agreeing with the subject) − logit(the other form) at the last token")
    return _assemble("agreement", prompts, tokenizer, config, description, dropped)


def ioi_task(tokenizer: Any, config: TaskConfig = TaskConfig(), *, names: Sequence[str] = IOI_NAMES,
             templates: Sequence[str] = IOI_TEMPLATES, places: Sequence[str] = IOI_PLACES,
             objects: Sequence[str] = IOI_OBJECTS) -> Task:
    """Indirect-object identification ("When Mary and John went to the store, John gave a drink to" → Mary).

    Raises `TaskError` (with the names that are single tokens) when the vocabulary has fewer than
    `config.min_words` single-token names: the task is then unavailable for this model.
    """
    for template in templates:
        _check_template(template, ("name1", "name2", "subject", "place", "object"), "templates")
    dropped: dict[str, str] = {}
    name_ids = _keep_single_tokens(names, tokenizer, config, "name", dropped)
    usable = list(name_ids)
    _require_enough_words("IOI", usable, f"{len(names)} candidate names are single tokens", tokenizer, config,
                          why=" (a multi-token name would make the answer more than one token)")

    def draw(rng: np.random.Generator):
        template = templates[rng.integers(len(templates))]
        indirect, subject = (usable[i] for i in rng.choice(len(usable), size=2, replace=False))
        first, second = (indirect, subject) if rng.integers(2) == 0 else (subject, indirect)
        fill = dict(name1=first, name2=second, place=places[rng.integers(len(places))],
                    object=objects[rng.integers(len(objects))])
        clean = template.format(subject=subject, **fill)
        corrupted = template.format(subject=indirect, **fill)  # the other name repeated: the answer flips
        return template, clean, corrupted, name_ids[indirect], name_ids[subject]

    prompts = _fill_prompts("ioi", draw, templates, tokenizer, config, dropped)
    description = ("indirect-object identification; metric = logit(indirect object) − logit(repeated subject) "
                   "at the last token")
    return _assemble("ioi", prompts, tokenizer, config, description, dropped)


def make_task(name: str, tokenizer: Any, config: TaskConfig = TaskConfig(), *,
              token_stream: np.ndarray | None = None) -> Task:
    """Build the task `name` (one of `TASK_NAMES`); the induction tasks need `token_stream` (held-out ids)."""
    if name not in TASK_NAMES:
        raise ParameterError(f"task={name!r} is not allowed: choose one of {list(TASK_NAMES)}")
    if name == "induction_random":
        return induction_task(tokenizer, token_stream, config)
    if name == "induction_text":
        return induction_task(tokenizer, token_stream, config, natural=True)
    if name == "agreement":
        return agreement_task(tokenizer, config)
    return ioi_task(tokenizer, config)


def make_tasks(names: Sequence[str], tokenizer: Any, config: TaskConfig = TaskConfig(), *,
               token_stream: np.ndarray | None = None) -> tuple[dict[str, Task], dict[str, str]]:
    """Build several tasks; those this tokenizer cannot support are skipped: (tasks, {name: why skipped})."""
    tasks, skipped = {}, {}
    for name in names:
        try:
            tasks[name] = make_task(name, tokenizer, config, token_stream=token_stream)
        except TaskError as e:
            skipped[name] = str(e)
    return tasks, skipped


# --------------------------------------------------------------------------------------------
# Running a task on a model, and on every snapshot of a suite
# --------------------------------------------------------------------------------------------


def check_task_fits(task: Task, model: Any) -> None:
    """Stop early when the task's tokens or length do not fit the model."""
    config = model.config
    vocab = int(config.vocab_size)
    largest = int(torch.stack([task.clean.max(), task.corrupted.max(), task.correct.max(), task.wrong.max()]).max())
    require(largest < vocab, "task", task.name,
            f"a task built with this model's tokenizer (its token ids reach {largest}, the model has {vocab} tokens)")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None:
        require(task.clean.shape[1] <= int(context), "task", task.name,
                f"prompts of at most {context} tokens (this model's context); they have {task.clean.shape[1]}")


def model_device(model: Any) -> torch.device:
    """The device a torch model's weights are on."""
    return next(model.parameters()).device


@torch.no_grad()
def task_metric(model: Any, task: Task, *, corrupted: bool = False, batch_size: int = 64) -> float:
    """The task's metric for `model` on the clean (or corrupted) prompts."""
    check_task_fits(task, model)
    require(isinstance(batch_size, int) and batch_size > 0, "batch_size", batch_size, "a positive integer")
    ids = task.input_ids(corrupted).to(model_device(model))
    total = 0.0
    for start in range(0, task.n_prompts, batch_size):
        chunk = slice(start, start + batch_size)
        logits = model(input_ids=ids[chunk]).logits
        total += float(task.metric_share(logits, chunk))
    return total


class SnapshotModels(Sequence):
    """The models of some snapshots of a suite, loaded on first use, in step order.

    ``models[i]`` is the model at ``models.steps[i]``. `keep` bounds how many stay in memory
    (None keeps them all: fine for the tiny suite; use 1–2 for large Pythia models).
    """

    def __init__(self, suite: str | os.PathLike, steps: Sequence[int] | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, keep: int | None = None):
        from crosslib.models.suite import iter_steps

        self.suite = str(suite)
        self.steps: list[int] = list(iter_steps(suite, None if steps is None else list(steps)))
        require(len(self.steps) > 0, "steps", steps, "at least one step of the suite")
        require(keep is None or (isinstance(keep, int) and keep > 0), "keep", keep, "None or a positive integer")
        self.device, self.dtype, self.keep = device, dtype, keep
        self._loaded: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        from crosslib.models.snapshots import load_snapshot

        require(isinstance(index, int) and -len(self) <= index < len(self), "index", index,
                f"an index in 0..{len(self) - 1}")
        step = self.steps[index]
        if step not in self._loaded:
            self._loaded[step] = load_snapshot(self.suite, step, device=self.device, dtype=self.dtype,
                                               with_tokenizer=False)[0]
            while self.keep is not None and len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(step)
        return self._loaded[step]

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def at_step(self, step: int) -> Any:
        require(step in self.steps, "step", step, f"one of {self.steps}")
        return self[self.steps.index(step)]


def model_steps(models: Sequence[Any], steps: Sequence[int] | None) -> list[int]:
    """Step labels for a sequence of models: `steps`, else `models.steps`, else 0, 1, 2, ..."""
    if steps is None:
        steps = getattr(models, "steps", None) or list(range(len(models)))
    steps = [int(s) for s in steps]
    require(len(steps) == len(models), "steps", steps, f"one step per model ({len(models)} models)")
    return steps


def performance_curve(task: Task, models: Sequence[Any], *, steps: Sequence[int] | None = None,
                      batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    """The task's metric at every snapshot: columns step, metric (clean prompts), corrupted_metric.

    `models` is a `SnapshotModels` (or any sequence of models, with `steps` as their labels).
    """
    labels = model_steps(models, steps)
    rows = []
    for index in tqdm(range(len(models)), desc=f"{task.name} per snapshot", disable=not progress):
        model = models[index]
        rows.append({"step": labels[index], "metric": task_metric(model, task, batch_size=batch_size),
                     "corrupted_metric": task_metric(model, task, corrupted=True, batch_size=batch_size)})
    return pd.DataFrame(rows)


def turn_on_step(steps: Sequence[int], values: Sequence[float], fraction: float = 0.5) -> int | None:
    """The first step at which `values` reaches `fraction` of its final value (None if the final value is ≤ 0).

    Used for "when does the task turn on" (values = the metric per snapshot) and, with a
    feature's attribution per snapshot, for when a feature starts to matter.
    """
    require_fraction("fraction", fraction)
    steps, values = list(steps), np.asarray(values, dtype=float)
    require(len(steps) == len(values) and len(steps) > 0, "values", len(values), f"one value per step ({len(steps)})")
    final = values[-1]
    if not np.isfinite(final) or final <= 0:
        return None
    reached = np.flatnonzero(values >= fraction * final)
    return int(steps[reached[0]])
