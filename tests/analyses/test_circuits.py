"""Tasks, splicing, attribution and interventions (crosslib.analyses.tasks, crosslib.analyses.attribution) on tiny models.

The models are random 2-layer GPT-NeoX models over a byte-level BPE trained here on sentences made
from the tasks' own word lists, so every task can be built; a second tokenizer trained on text
without those words checks the errors. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crosslib.analyses.attribution import (
    AttributionConfig,
    InterventionConfig,
    Splice,
    SpliceState,
    ablation_curve,
    attribute,
    attribute_snapshot,
    attribution_onsets,
    dominant_features,
    evolution_table,
    patching_curve,
    snapshot_activations,
    spliced_metric,
)
from crosslib.analyses.tasks import (
    AGREEMENT_NOUNS,
    AGREEMENT_VERBS,
    IOI_NAMES,
    IOI_OBJECTS,
    IOI_PLACES,
    TASK_NAMES,
    SnapshotModels,
    TaskConfig,
    TaskError,
    agreement_task,
    check_task_fits,
    induction_task,
    ioi_task,
    make_task,
    make_tasks,
    performance_curve,
    task_metric,
    turn_on_step,
)
from crosslib.config import ParameterError
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.text.tokenizer import encode_documents, train_tokenizer

D_MODEL = 32
HOOK = "blocks.0.hook_resid_post"
LAST_HOOK = "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


def project_sentences(seed: int = 0, n: int = 1500) -> list[str]:
    """Sentences that use every task word often, so that a small BPE makes each word one token."""
    rng = np.random.default_rng(seed)
    nouns = [w for pair in AGREEMENT_NOUNS for w in pair]
    verbs = [w for pair in AGREEMENT_VERBS for w in pair]
    sentences = []
    for i in range(n):
        a, b = rng.choice(IOI_NAMES, size=2, replace=False)
        sentences.append(
            f"When {a} and {b} went to the {rng.choice(IOI_PLACES)}, {b} gave a {rng.choice(IOI_OBJECTS)} to {a}. "
            f"The {rng.choice(nouns)} near the {rng.choice(nouns)} {rng.choice(verbs)} here. "
            f"{nouns[i % len(nouns)]} {verbs[i % len(verbs)]} {IOI_NAMES[i % len(IOI_NAMES)]}."
        )
    return ["\n".join(sentences[i: i + 20]) for i in range(0, n, 20)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(project_sentences(), 1200, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def stream(tokenizer) -> np.ndarray:
    return encode_documents(tokenizer, project_sentences(seed=1, n=400))


@pytest.fixture(scope="module")
def poor_tokenizer(tmp_path_factory):
    """A tokenizer of a corpus without names or agreement verbs: a vocabulary too small for IOI and agreement."""
    docs = ["the cat sees a red house today. a dog likes the small garden at night."] * 50
    return train_tokenizer(docs, 300, tmp_path_factory.mktemp("poor"))


def random_neox(vocab_size: int, seed: int, dtype: torch.dtype = torch.float32, context: int = 64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=context, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # random init has zero biases and unit norms; make every part matter
        for name, p in model.named_parameters():
            if "bias" in name or "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(5.0)  # larger weights: logit differences far from zero
    return model.to(dtype)


def random_crosscoder(n_snapshots: int, activation: str = "relu", seed: int = 0, dict_size: int = 48,
                      dtype: torch.dtype = torch.float32) -> Crosscoder:
    config = CrosscoderConfig(n_snapshots=n_snapshots, d_model=D_MODEL, dict_size=dict_size, activation=activation,
                              decoder_init_norm=1.0, threshold_init=0.05)
    coder = Crosscoder(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # break the tied init so encoder, decoder and biases are all non-trivial
        coder.W_E.add_(0.3 * torch.randn(coder.W_E.shape, generator=generator))
        coder.b_E.add_(0.1 * torch.randn(coder.b_E.shape, generator=generator))
        coder.b_D.add_(0.2 * torch.randn(coder.b_D.shape, generator=generator))
    return coder.to(dtype)


def norm_factors_of(activations: torch.Tensor) -> np.ndarray:
    """√d / mean‖x^θ‖ per snapshot, as the activation cache stores it."""
    mean_norm = activations.norm(dim=-1).mean(dim=(0, 1))
    return (math.sqrt(activations.shape[-1]) / mean_norm).double().numpy()


@pytest.fixture(scope="module")
def small_config() -> TaskConfig:
    return TaskConfig(n_prompts=6, induction_length=5, frequent_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def tasks(tokenizer, stream, small_config):
    built, skipped = make_tasks(TASK_NAMES, tokenizer, small_config, token_stream=stream)
    assert skipped == {}
    return built


@pytest.fixture(scope="module")
def models(tokenizer):
    return [random_neox(len(tokenizer), seed=s) for s in (0, 1)]


# ------------------------------------------------------------------------------------ tasks


def test_every_target_is_one_token_in_context(tasks, tokenizer):
    assert set(tasks) == set(TASK_NAMES)
    for task in tasks.values():
        assert task.dropped == {}, task.dropped  # this tokenizer has every word as one token
        assert task.clean.shape == task.corrupted.shape and task.n_prompts == 6
        for p in range(task.n_prompts):
            length = int(task.lengths[p])
            for t in np.flatnonzero(task.valid[p].numpy()):
                position = int(task.positions[p, t])
                assert position < length
                for target in (int(task.correct[p, t]), int(task.wrong[p, t])):
                    text = tokenizer.decode([target])
                    assert tokenizer.encode(text, add_special_tokens=False) == [target]
                    prefix = tokenizer.decode(task.clean[p, : position + 1].tolist())
                    assert (tokenizer.encode(prefix + text, add_special_tokens=False)
                            == task.clean[p, : position + 1].tolist() + [target])


def test_task_answers_are_the_right_words(tasks, tokenizer, stream):
    word = lambda t: tokenizer.decode([int(t)]).strip()  # noqa: E731
    plural_verbs = {plural for _, plural in AGREEMENT_VERBS}
    plural_nouns = {plural for _, plural in AGREEMENT_NOUNS}
    agreement = tasks["agreement"]
    for p, text in enumerate(agreement.texts):
        subject = text.split()[1]
        assert (word(agreement.correct[p, 0]) in plural_verbs) == (subject in plural_nouns)
        assert word(agreement.wrong[p, 0]) != word(agreement.correct[p, 0])
        assert agreement.corrupted_texts[p].split()[1] != subject  # the subject's number is flipped
        assert agreement.corrupted_texts[p].split()[2:] == text.split()[2:]
    ioi = tasks["ioi"]
    for p, text in enumerate(ioi.texts):
        names = [w.strip(",.") for w in text.split() if w.strip(",.") in IOI_NAMES]
        assert names.count(word(ioi.correct[p, 0])) == 1 and names.count(word(ioi.wrong[p, 0])) == 2
        corrupted = [w.strip(",.") for w in ioi.corrupted_texts[p].split() if w.strip(",.") in IOI_NAMES]
        assert corrupted.count(word(ioi.wrong[p, 0])) == 1  # the other name is repeated: answer flips
    for name in ("induction_random", "induction_text"):
        task = tasks[name]
        half = 5
        assert torch.equal(task.clean[:, :half], task.clean[:, half:])
        assert torch.equal(task.corrupted[:, half:], task.clean[:, half:])
        assert task.positions[0].tolist() == [5, 6, 7, 8]
        assert torch.equal(task.correct, task.clean[:, 1:half])  # the token that followed in the first copy
        assert torch.equal(task.wrong[task.valid], task.corrupted[:, 1:half][task.valid])
    random_task = tasks["induction_random"]
    for p in range(random_task.n_prompts):  # distinct tokens, and the wrong ones never occur in the clean prompt
        assert len(set(random_task.clean[p, :5].tolist())) == 5
        assert not set(random_task.wrong[p].tolist()) & set(random_task.clean[p].tolist())


def test_broken_words_and_templates_give_clear_errors(tokenizer, poor_tokenizer, stream, small_config):
    strict = small_config.replace(strict=True)
    nouns = list(AGREEMENT_NOUNS[:4]) + [("xylophonist", "xylophonists")]
    with pytest.raises(TaskError, match=r"noun ' xylophonist' is \d+ tokens .* in tokenizer .*\(\d+ tokens\)"):
        agreement_task(tokenizer, strict, nouns=nouns)
    lenient = agreement_task(tokenizer, small_config, nouns=nouns)  # dropped and reported instead
    assert set(lenient.dropped) == {"xylophonist", "xylophonists"}

    # "{subject}s" glues a letter to the noun: singular and plural prompts tokenize to different lengths.
    glued = ("The {subject}s near the {attractor}",)
    with pytest.raises(TaskError, match=r"template 'The \{subject\}s near the \{attractor\}'.*different token counts"):
        agreement_task(tokenizer, strict, templates=glued)
    mixed = agreement_task(tokenizer, small_config, templates=glued + ("The {subject} of the {attractor}",))
    assert "The {subject}s near the {attractor}" in mixed.dropped and all(" of the " in t for t in mixed.texts)
    with pytest.raises(ParameterError, match=r"templates=.*placeholders"):
        agreement_task(tokenizer, small_config, templates=("The {noun} near the {attractor}",))

    # A vocabulary without single-token names or verbs: the tasks are skipped with a reason.
    with pytest.raises(TaskError, match=r"IOI task is not available with tokenizer .*300 tokens.*min_words=4"):
        ioi_task(poor_tokenizer, small_config)
    built, skipped = make_tasks(["ioi", "agreement", "induction_random"], poor_tokenizer,
                                small_config.replace(induction_length=3),
                                token_stream=encode_documents(poor_tokenizer, ["the cat sees a red house today."] * 40))
    assert set(skipped) == {"ioi", "agreement"} and "' is'" in skipped["agreement"]
    assert set(built) == {"induction_random"}

    with pytest.raises(TaskError, match=r"induction_length=100 needs at least 200 distinct frequent tokens"):
        induction_task(tokenizer, stream, small_config.replace(induction_length=100))
    with pytest.raises(ParameterError, match=r"token_stream=None"):
        make_task("induction_text", tokenizer, small_config)
    with pytest.raises(ParameterError, match=r"task='copying'.*induction_random"):
        make_task("copying", tokenizer, small_config)
    with pytest.raises(ParameterError, match=r"frequent_fraction=1.5"):
        TaskConfig(frequent_fraction=1.5)


def test_metric_is_the_mean_logit_difference(tasks, models):
    model = models[0]
    for task in tasks.values():
        with torch.no_grad():
            logits = model(input_ids=task.clean).logits
        by_hand = []
        for p in range(task.n_prompts):
            for t in np.flatnonzero(task.valid[p].numpy()):
                row = logits[p, int(task.positions[p, t])]
                by_hand.append(float(row[task.correct[p, t]] - row[task.wrong[p, t]]))
        assert task_metric(model, task, batch_size=4) == pytest.approx(np.mean(by_hand), abs=1e-5)
        assert abs(np.mean(by_hand)) > 1e-3  # not trivially zero
        # Right-padding never changes the logits the metric reads.
        short = int(task.lengths.argmin())
        alone = model(input_ids=task.clean[short: short + 1, : int(task.lengths[short])]).logits
        padded = task.logit_differences(logits[short: short + 1], slice(short, short + 1))
        assert torch.allclose(task.logit_differences(alone, slice(short, short + 1)), padded, atol=1e-5)

    long_task = tasks["induction_random"]
    with pytest.raises(ParameterError, match=r"prompts of at most 8 tokens"):
        check_task_fits(long_task, random_neox(models[0].config.vocab_size, seed=0, context=8))


def test_performance_curve_over_a_suite(micro_suite):
    from crosslib.models.snapshots import load_tokenizer
    from crosslib.models.suite import corpus_tokens

    tokenizer = load_tokenizer(micro_suite)
    task = induction_task(tokenizer, corpus_tokens(micro_suite, "heldout"), TaskConfig(n_prompts=4, induction_length=6))
    models = SnapshotModels(micro_suite, [0, 4, 12], keep=1)
    curve = performance_curve(task, models)
    assert curve["step"].tolist() == [0, 4, 12]
    assert curve["metric"].iloc[-1] == pytest.approx(task_metric(models.at_step(12), task), abs=1e-6)
    assert np.isfinite(curve[["metric", "corrupted_metric"]].to_numpy()).all()
    assert turn_on_step([0, 1, 2, 3], [0.0, 0.2, 0.6, 1.0]) == 2
    assert turn_on_step([0, 1], [1.0, -0.5]) is None


# ------------------------------------------------------------------------------------ splicing


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_splicing_leaves_logits_unchanged(tasks, models, activation):
    task = tasks["ioi"]
    activations = snapshot_activations(models, HOOK, task.clean)
    factors = norm_factors_of(activations)
    coder = random_crosscoder(2, activation)
    for snapshot, model in enumerate(models):
        splice = Splice(coder, HOOK, snapshot, norm_factors=factors)
        state = splice.encode(activations)
        assert (state.features > 0).float().mean() > 0.05  # features fire: the reconstruction is not just b_D
        reconstruction = splice.reconstruct(state.features)
        assert (state.error.norm(dim=-1) > 1e-3).all()  # a random dictionary: the error carries a lot
        assert torch.allclose(reconstruction + state.error, activations[:, :, snapshot], atol=1e-5)
        with torch.no_grad():
            plain = model(input_ids=task.clean).logits
            spliced = splice.logits(model, task.clean, state)
            without_error = splice.logits(model, task.clean, SpliceState(state.features, torch.zeros_like(state.error)))
        assert torch.allclose(spliced, plain, atol=1e-5, rtol=1e-5)
        assert (spliced - without_error).abs().max() > 1e-2  # so the splice really goes through the hook

    # Per-snapshot SAEs: one S = 1 SAE (the simple case), and S SAEs trained in one pass (independent=True).
    sae = random_crosscoder(1, activation, seed=3)
    splice = Splice(sae, HOOK, norm_factors=factors[:1])
    state = splice.encode(activations[:, :, :1])
    independent = Crosscoder(coder.config.replace(independent=True), seed=4)
    independent_state = Splice(independent, HOOK, 1, norm_factors=factors).encode(activations)
    with torch.no_grad():
        assert torch.allclose(splice.logits(models[0], task.clean, state), models[0](input_ids=task.clean).logits,
                              atol=1e-5, rtol=1e-5)
        assert torch.allclose(Splice(independent, HOOK, 1, norm_factors=factors).logits(models[1], task.clean,
                                                                                        independent_state),
                              models[1](input_ids=task.clean).logits, atol=1e-5, rtol=1e-5)
    # Snapshot 1 of the independent model is its own SAE: it ignores snapshot 0's activations.
    alone = Splice(independent.sae(1), HOOK, norm_factors=factors[1:]).encode(activations[:, :, 1:])
    assert torch.allclose(alone.features, independent_state.features, atol=1e-6)


def test_crosscoder_features_are_encoded_from_all_snapshots_jointly(tasks, models):
    task = tasks["agreement"]
    activations = snapshot_activations(models, HOOK, task.clean)
    factors = norm_factors_of(activations)
    coder = random_crosscoder(2)
    state = Splice(coder, HOOK, 1, norm_factors=factors).encode(activations)
    normalised = activations * torch.as_tensor(factors, dtype=torch.float32)[:, None]
    joint = coder.encode(normalised.reshape(-1, 2, D_MODEL))[:, 1].reshape(state.features.shape)
    assert torch.allclose(state.features, joint)
    alone = normalised.clone()
    alone[:, :, 0] = 0  # the wrong way: snapshot 1's activations only
    wrong = coder.encode(alone.reshape(-1, 2, D_MODEL))[:, 1].reshape(state.features.shape)
    assert (wrong - state.features).abs().max() > 0.1

    with pytest.raises(ParameterError, match=r"norm_factors=.*2 positive finite numbers"):
        Splice(coder, HOOK, 0, norm_factors=[1.0])
    with pytest.raises(ParameterError, match=r"snapshot=2.*0\.\.1"):
        Splice(coder, HOOK, 2, norm_factors=factors)
    with pytest.raises(ParameterError, match=r"activations=.*n_snapshots=2"):
        Splice(coder, HOOK, 0, norm_factors=factors).encode(activations[:, :, :1])
    with pytest.raises(ParameterError, match=r"hook='blocks.0.resid'"):
        Splice(coder, "blocks.0.resid", 0, norm_factors=factors)


# ------------------------------------------------------------------------------------ attribution


@pytest.fixture(scope="module")
def double_setup(tasks, tokenizer):
    """Float64 models and crosscoder, so finite differences can be compared tightly."""
    task = tasks["ioi"]
    models64 = [random_neox(len(tokenizer), seed=s, dtype=torch.float64) for s in (0, 1)]
    activations = snapshot_activations(models64, HOOK, task.clean).double()
    coder = random_crosscoder(2, dtype=torch.float64)
    splice = Splice(coder, HOOK, 1, norm_factors=norm_factors_of(activations))
    return task, models64, activations, splice


def _metric_with(splice, model, task, features, error):
    return spliced_metric(splice, model, task, SpliceState(features, error), batch_size=4)


def test_attribution_equals_finite_differences(double_setup):
    task, models64, activations, splice = double_setup
    model = models64[1]
    result = attribute_snapshot(task, splice, model, activations, config=AttributionConfig(ig_steps=0, batch_size=4))
    state = splice.encode(activations)
    assert result.spliced_metric == pytest.approx(result.metric, abs=1e-9)
    assert abs(result.metric) > 1e-2

    # Gradient w.r.t. one feature at one (prompt, position): (m(f + ε) − m(f − ε)) / 2ε.
    leaf = state.features.clone().requires_grad_(True)
    _ = spliced_metric(splice, model, task, state.with_features(leaf), batch_size=4, backward=True)
    prompt, position, feature = (int(i) for i in torch.nonzero(leaf.grad.abs() == leaf.grad.abs().max())[0])
    eps = 1e-4
    bumped = [state.features.clone() for _ in range(2)]
    bumped[0][prompt, position, feature] += eps
    bumped[1][prompt, position, feature] -= eps
    difference = (_metric_with(splice, model, task, bumped[0], state.error)
                  - _metric_with(splice, model, task, bumped[1], state.error)) / (2 * eps)
    assert difference == pytest.approx(float(leaf.grad[prompt, position, feature]), rel=1e-5)

    # Activation × gradient of the largest features = d/dε of m when the feature is scaled by (1 + ε).
    for feature in np.argsort(-np.abs(result.attribution))[:3]:
        scaled = []
        for sign in (1, -1):
            features = state.features.clone()
            features[..., feature] *= 1 + sign * eps
            scaled.append(_metric_with(splice, model, task, features, state.error))
        assert (scaled[0] - scaled[1]) / (2 * eps) == pytest.approx(result.attribution[feature], rel=1e-5)
    assert np.abs(result.attribution).max() > 1e-3
    assert (result.attribution[~result.active] == 0).all()

    # The error term's attribution the same way.
    scaled = [_metric_with(splice, model, task, state.features, state.error * (1 + sign * eps)) for sign in (1, -1)]
    assert (scaled[0] - scaled[1]) / (2 * eps) == pytest.approx(result.error_attribution, rel=1e-5)


def test_integrated_gradients_are_complete(double_setup):
    task, models64, activations, splice = double_setup
    result = attribute_snapshot(task, splice, models64[1], activations, config=AttributionConfig(ig_steps=24, batch_size=4))
    lost = result.spliced_metric - result.metric_without_features
    assert abs(lost) > 1e-2
    assert result.integrated_gradients.sum() == pytest.approx(lost, rel=2e-3)
    # The first-order sum is a different (cruder) estimate: IG is not just activation × gradient.
    assert not np.allclose(result.integrated_gradients, result.attribution, rtol=1e-3)


def test_attribute_over_snapshots_and_evolution_tables(tasks, models):
    task = tasks["agreement"]
    coder = random_crosscoder(2)
    factors = norm_factors_of(snapshot_activations(models, HOOK, task.clean))
    activations = snapshot_activations(models, HOOK, task.clean)
    result = attribute(task, coder, models, HOOK, norm_factors=factors, steps=[100, 200],
                       config=AttributionConfig(ig_steps=4, batch_size=4))
    again = attribute(task, coder, models, HOOK, norm_factors=factors, snapshots=[1], activations=activations,
                      config=AttributionConfig(ig_steps=4, batch_size=4))
    assert again.steps == [1] and np.allclose(again.snapshots[0].attribution, result.snapshots[1].attribution)
    summary = result.summary()
    assert summary["step"].tolist() == [100, 200]
    assert np.allclose(summary["spliced_metric"], summary["metric"], atol=1e-5)
    assert summary["metric"].iloc[0] != pytest.approx(summary["metric"].iloc[1])
    assert result.table()["active"].all() and len(result.table(active_only=False)) == 2 * coder.config.dict_size

    performance = performance_curve(task, models, steps=[100, 200])
    dominant = dominant_features(result, top_n=3)
    assert dominant.groupby("step")["rank"].apply(list).tolist() == [[1, 2, 3], [1, 2, 3]]
    for step, group in dominant.groupby("step"):
        snapshot = result.at_step(step)
        assert group["feature"].tolist() == snapshot.top_features(3).tolist()
        assert group["score"].is_monotonic_decreasing
        assert group["share"].iloc[0] == pytest.approx(
            snapshot.attribution[group["feature"].iloc[0]] / np.abs(snapshot.attribution).sum())
    table = evolution_table(result, performance, top_n=3)
    assert set(table["feature"]) == set(dominant["feature"]) and len(table) == 2 * table["feature"].nunique()
    assert table.loc[table["step"] == 200, "metric"].iloc[0] == pytest.approx(performance["metric"].iloc[1])
    assert table["is_top"].sum() == 6
    onsets = attribution_onsets(result, top_n=3)
    assert onsets["feature"].tolist() == result.snapshots[-1].top_features(3).tolist()
    assert onsets["onset_step"].isin([100, 200]).all()

    with pytest.raises(ParameterError, match=r"models=.*one model per snapshot"):
        attribute(task, coder, models[:1], HOOK, norm_factors=factors)
    with pytest.raises(ParameterError, match=r"by='integrated_gradients' is not available"):
        attribute(task, coder, models, HOOK, norm_factors=factors, snapshots=[0],
                  config=AttributionConfig(ig_steps=0)).snapshots[0].scores("integrated_gradients")


# ------------------------------------------------------------------------------------ interventions


def test_ablating_planted_features_beats_random(tasks, models):
    """An SAE whose features 0-2 write along the direction that raises the metric (planted):
    attribution finds them, and ablating them lowers the metric far more than random active features."""
    task = tasks["ioi"]
    model = models[0]
    activations = snapshot_activations([model], LAST_HOOK, task.clean)
    sae = random_crosscoder(1, seed=5, dict_size=40)
    ones = np.ones(1)
    state = Splice(sae, LAST_HOOK, norm_factors=ones).encode(activations)
    error = state.error.clone().requires_grad_(True)  # ∂m/∂error = ∂m/∂x at the hook
    spliced_metric(Splice(sae, LAST_HOOK, norm_factors=ones), model, task, SpliceState(state.features, error),
                   backward=True)
    uphill = error.grad.sum(dim=(0, 1))
    uphill = uphill / uphill.norm()
    typical = float(activations.norm(dim=-1).mean())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for feature in range(3):
            direction = uphill + 0.3 * torch.randn(D_MODEL, generator=generator) / math.sqrt(D_MODEL)
            sae.W_D[0, feature] = direction / direction.norm()
            sae.W_E[0, :, feature] = 0.0
            sae.b_E[feature] = 0.15 * typical  # always on, writing 0.15 of a typical activation's norm
    splice = Splice(sae, LAST_HOOK, norm_factors=ones)
    result = attribute_snapshot(task, splice, model, activations, config=AttributionConfig(ig_steps=0))
    assert set(result.top_features(3).tolist()) == {0, 1, 2}

    ablation = ablation_curve(task, splice, model, activations, result.attribution,
                              config=InterventionConfig(ks=(1, 3, 100), random_draws=4))
    curve = ablation.curve.set_index(["k", "selection"])
    base = ablation.spliced_metric
    assert base == pytest.approx(result.metric, abs=1e-5)
    top_drop = base - curve.loc[(3, "top"), "metric"]
    random_drop = base - curve.loc[(3, "random"), "metric"]
    assert top_drop > 0.5 and top_drop > 5 * abs(random_drop)
    assert curve.loc[(3, "top"), "fraction_lost"] == pytest.approx(top_drop / base)
    assert curve.loc[(100, "top"), "n_features"] == ablation.n_active < 40  # k capped at the active features
    # Ablating every active feature is not ablating none, and equals the k = all row.
    assert abs(ablation.metric_all_ablated - base) > 0.1
    assert curve.loc[(100, "top"), "metric"] == pytest.approx(ablation.metric_all_ablated, abs=1e-6)
    assert ablation.fraction_lost_all == pytest.approx((base - ablation.metric_all_ablated) / base)
    assert ablation.fraction_lost(3) == curve.loc[(3, "top"), "fraction_lost"]
    assert ablation.smallest_k(ablation.fraction_lost(3)) in (1, 3)
    assert ablation.smallest_k(10.0) is None
    with pytest.raises(ParameterError, match=r"k=7.*\[1, 3, 100\]"):
        ablation.fraction_lost(7)


def test_patching_recovers_the_clean_metric(tasks, models):
    task = tasks["induction_random"]
    coder = random_crosscoder(2)
    clean = snapshot_activations(models, HOOK, task.clean)
    corrupted = snapshot_activations(models, HOOK, task.corrupted)
    splice = Splice(coder, HOOK, 0, norm_factors=norm_factors_of(clean))
    result = patching_curve(task, splice, models[0], clean, corrupted,
                            config=InterventionConfig(ks=(1, 2, 48), random_draws=3))
    assert result.clean_metric == pytest.approx(task_metric(models[0], task), abs=1e-5)
    assert result.corrupted_metric == pytest.approx(task_metric(models[0], task, corrupted=True), abs=1e-5)
    assert abs(result.clean_metric - result.corrupted_metric) > 0.1
    # Patching every feature and the error restores the clean hook activation exactly.
    assert result.recovery_all_features_and_error == pytest.approx(1.0, abs=1e-4)
    curve = result.curve.set_index(["k", "selection"])
    assert curve.loc[(48, "top"), "recovery"] == pytest.approx(result.recovery_all_features, abs=1e-6)
    assert curve.loc[(48, "random"), "recovery_std"] == pytest.approx(0.0, abs=1e-9)  # all candidates every draw
    assert result.recovery_all_features != pytest.approx(0.0, abs=1e-3)
    assert result.recovery(2, "random") == curve.loc[(2, "random"), "recovery"]

    # Integrated gradients along corrupted → clean: the scores add up to the effect of patching every feature
    integrated = patching_curve(task, splice, models[0], clean, corrupted,
                                config=InterventionConfig(ks=(1, 2), rank_by="integrated_gradients", ig_steps=64,
                                                          random_draws=1))
    effect_of_all = integrated.recovery_all_features * (integrated.clean_metric - integrated.corrupted_metric)
    assert integrated.scores.sum() == pytest.approx(effect_of_all, rel=0.02, abs=1e-4)
    first_order = result.scores.sum()
    assert abs(first_order - effect_of_all) > abs(integrated.scores.sum() - effect_of_all)  # IG is the closer one

    with pytest.raises(ParameterError, match=r"ig_steps=0"):
        InterventionConfig(ig_steps=0)
    with pytest.raises(ParameterError, match=r"ks=\(5, 2\)"):
        InterventionConfig(ks=(5, 2))
    with pytest.raises(ParameterError, match=r"rank_by='gradient'"):
        InterventionConfig(rank_by="gradient")
    with pytest.raises(ParameterError, match=r"ig_steps=-1"):
        AttributionConfig(ig_steps=-1)
