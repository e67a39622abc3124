"""ALEAHallu's parts on tiny models: the activation pairs, teacher-forced batches (batched == one by one == the
prompt with the tokens appended), the prefix hook, locating on a constructed case, the prefix objective, the edit
touching nothing outside the located parameters, the resumable loop, and the input errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image

from halluscope.errors import InputError
from halluscope.models import load_vlm
from halluscope.metrics.pope import answer_templates
from halluscope.training.alea.activations import caption_pairs, ground_caption, pope_pairs
from halluscope.training.alea.edit import EditConfig, edit_parameters
from halluscope.training.alea.locate import layer_differentials, parameter_names, select_layers
from halluscope.training.alea.optimise import optimise
from halluscope.training.alea.prefix import SoftPrefix, initial_prefix, inserted, mean_nll, train_prefix
from halluscope.training.sequences import encode_responses, response_ids, response_nll


def _image(colour=(200, 40, 40), size=56) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    image.paste(colour, (8, 8, size - 8, size - 8))
    return image


def _rows(vlm, texts=("a red circle", "two blue squares and a star")):
    return [(_image((40 * k, 90, 200 - 40 * k)), "Describe this image.", response_ids(vlm, text))
            for k, text in enumerate(texts)]


# ---- activation pairs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption,absent,expected", [
    ("A red circle, a blue star and two squares.", {"star"}, "A red circle and two squares."),
    ("A red circle, a blue star and two squares.", {"circle"}, "A blue star and two squares."),
    ("A dog sits on a bench. A frisbee lies nearby.", {"frisbee"}, "A dog sits on a bench."),
    ("A blue star.", {"star"}, ""),
])
def test_ground_caption_drops_the_clauses_naming_absent_objects(caption, absent, expected):
    assert ground_caption(caption, lambda clause: any(word in clause for word in absent)) == expected


def test_caption_pairs_keep_only_captions_that_ground_cleanly():
    captions = pd.DataFrame({"image_id": [1, 2, 3], "prompt": "Describe this image.",
                             "reply": ["A circle and a star.", "A circle.", "A star."],
                             "reply_ids": [[1, 2], [3], [4]]})
    truth = {1: {"circle"}, 2: {"circle"}, 3: {"circle"}}

    def extract(text: str) -> list[str]:
        return [w for w in ("circle", "star") if w in text]

    pairs = caption_pairs(captions, truth, extract, lambda text: [len(text)])
    assert pairs["image_id"].tolist() == [1]  # 2 names nothing absent; 3 has nothing left once grounded
    assert pairs.iloc[0][["grounded", "hallucinated", "object"]].tolist() == ["A circle.", "A circle and a star.",
                                                                             "star"]
    assert pairs.iloc[0]["hallucinated_ids"] == [1, 2] and pairs.iloc[0]["grounded_ids"] == [len("A circle.")]


@pytest.mark.parametrize("complete,grounded", [(True, "A circle, a heart and an arrow."), (False, "A circle.")])
def test_caption_pairs_add_the_present_objects_a_caption_left_out(complete, grounded):
    captions = pd.DataFrame({"image_id": [1], "prompt": "Describe this image.", "reply": ["A circle and a star."],
                             "reply_ids": [[1, 2]]})

    def extract(text: str) -> list[str]:
        return [w for w in ("circle", "star", "heart", "arrow") if w in text]

    pairs = caption_pairs(captions, {1: {"circle", "heart", "arrow"}}, extract, lambda text: [len(text)],
                          complete=complete, order=["star", "circle", "heart"])
    assert pairs["grounded"].tolist() == [grounded]  # in the vocabulary's order, unlisted objects last


def test_caption_pairs_leave_the_absent_objects_the_model_confirms_in_the_grounded_caption():
    captions = pd.DataFrame({"image_id": [1, 2], "prompt": "Describe this image.",
                             "reply": ["A circle, a star and a heart.", "A circle and a star."],
                             "reply_ids": [[1, 2, 3], [1, 2]]})

    def extract(text: str) -> list[str]:
        return [w for w in ("circle", "star", "heart", "arrow") if w in text]

    truth = {1: {"circle", "arrow"}, 2: {"circle"}}
    pairs = caption_pairs(captions, truth, extract, lambda text: [len(text)], confirmed={1: {"star"}, 2: {"star"}})
    assert pairs["image_id"].tolist() == [1]  # 2's only absent object is confirmed: no pair
    # the doubted heart goes, the confirmed star stays, the missed arrow (present) is added, nothing else
    assert pairs.iloc[0][["grounded", "object"]].tolist() == ["A circle, a star and an arrow.", "heart"]
    plain = caption_pairs(captions, truth, extract, lambda text: [len(text)])
    assert plain["grounded"].tolist() == ["A circle and an arrow.", "A circle."]


def test_answer_templates_use_the_models_own_words_and_fall_back():
    said = [("star", "Yes, there is a star.", "yes"), ("bolt", "Yes, there is a bolt.", "yes"),
            ("cross", "yes", "yes")]
    assert answer_templates(said) == {"yes": "Yes, there is a {}.", "no": "No"}


def test_pope_pairs_pair_the_correct_answer_with_the_opposite_in_the_models_words():
    questions = pd.DataFrame({"image_id": [1, 1], "prompt": ["Is there a star?", "Is there a bolt?"],
                              "object": ["star", "bolt"], "label": ["yes", "no"],
                              "reply": ["Yes, there is a star.", "Yes, there is a bolt."],
                              "reply_ids": [[7, 8], [7, 9]]})
    pairs = pope_pairs(questions, lambda text: [len(text)])
    right, wrong = pairs.iloc[0], pairs.iloc[1]
    assert (right["grounded"], right["grounded_ids"]) == ("Yes, there is a star.", [7, 8])  # its own reply
    assert right["hallucinated"] == "No" and right["hallucinated_ids"] == [2]  # it never said no: the fallback
    assert (wrong["hallucinated"], wrong["hallucinated_ids"]) == ("Yes, there is a bolt.", [7, 9])
    assert wrong["grounded"] == "No"


# ---- teacher-forced batches and the prefix hook ----------------------------------------------------------
def test_encode_responses_batched_equals_one_by_one_and_the_prompt_with_tokens_appended(vlm):
    from halluscope.sweep.slot import append_tokens

    rows = _rows(vlm)
    batch = encode_responses(vlm, rows)
    batched = response_nll(vlm.model(**batch.inputs).logits, batch, per_row=True)
    for row, expected in zip(rows, batched):
        single = encode_responses(vlm, [row])
        assert torch.allclose(response_nll(vlm.model(**single.inputs).logits, single), expected, atol=1e-5)
        naive = append_tokens(vlm.encode([row[:2]]), row[2])
        logits = vlm.model(**naive.inputs).logits[0, -len(row[2]) - 1:-1]
        by_hand = -torch.log_softmax(logits.float(), -1)[range(len(row[2])), row[2]].mean()
        assert torch.allclose(by_hand, expected, atol=1e-5)


def test_the_starting_prefix_leaves_the_logits_as_its_slot_tokens_give_them(vlm):
    prefix = initial_prefix(vlm, 3, seed=0)
    batch = encode_responses(vlm, _rows(vlm), prefix.slot_ids)
    plain = vlm.model(**batch.inputs).logits
    with inserted(vlm, prefix.vectors, batch.slots):
        hooked = vlm.model(**batch.inputs).logits
    assert torch.allclose(plain, hooked, atol=1e-5)
    moved = SoftPrefix(prefix.vectors + 1.0, prefix.slot_ids)
    with inserted(vlm, moved.vectors, batch.slots):
        assert not torch.allclose(plain, vlm.model(**batch.inputs).logits, atol=1e-3)
    assert len(vlm.embed_tokens._forward_hooks) == 0


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    """A tiny Qwen2-VL of its own, so tests may change its weights."""
    return lambda: load_vlm(tiny_dirs["qwen2_vl"])


def test_prefix_training_lowers_the_visual_neglect_objective(qwen, tmp_path):
    vlm = qwen()
    rows = _rows(vlm)
    start = initial_prefix(vlm, 4, seed=0)
    before = dict(vlm.model.named_parameters())
    before = {name: p.detach().clone() for name, p in before.items()}
    prefix, history = train_prefix(vlm, rows, tokens=4, lr=0.1, epochs=8, batch_size=2, seed=0,
                                   state_path=tmp_path / "state.pt", log=lambda line: None)
    assert mean_nll(vlm, rows, prefix) < mean_nll(vlm, rows, start) - 0.05
    assert history[-1]["step"] == 8 and not (tmp_path / "state.pt").exists()
    assert all(torch.equal(p, before[name]) for name, p in vlm.model.named_parameters())  # the model stayed frozen


# ---- locate ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score,scaled", [("update", 0), ("update", 1), ("residual", 1)])
def test_locate_picks_the_layer_whose_differential_was_made_largest(qwen, score, scaled):
    vlm = qwen()
    with torch.no_grad():
        vlm.layers[scaled].mlp.down_proj.weight.mul_(50.0)
    grounded = _rows(vlm, ("a red circle", "a star", "two squares"))
    hallucinated = _rows(vlm, ("a blue heart and a bolt", "a cross and a moon", "three hexagons"))
    table = layer_differentials(vlm, grounded, hallucinated, batch_size=2)
    assert sorted(table["pair"].unique()) == [0, 1, 2] and sorted(table["layer"].unique()) == [0, 1]
    layers, per_layer = select_layers(table, score=score, max_layers=1)
    assert layers == [scaled] and per_layer.loc[per_layer["layer"] == scaled, "wins"].item() == 3


def test_select_layers_keeps_every_winner_or_the_most_frequent():
    residual = [[1, 5, 2, 3], [1, 2, 6, 3], [1, 7, 2, 3]]  # pair x layer: layer 1 wins twice, layer 2 once
    table = pd.DataFrame({"pair": [p for p in range(3) for _ in range(4)], "layer": [0, 1, 2, 3] * 3,
                          "residual": [v for row in residual for v in row], "update": [1.0] * 12})
    layers, per_layer = select_layers(table)
    assert layers == [1, 2] and per_layer["wins"].tolist() == [0, 2, 1, 0]
    assert select_layers(table, max_layers=1)[0] == [1]
    assert select_layers(table, max_layers=3)[0] == [1, 2, 3]  # layer 3 never won: it comes in by its mean, 3 > 1


# ---- edit --------------------------------------------------------------------------------------------------
def test_the_edit_changes_the_located_parameters_and_nothing_else(qwen, tmp_path):
    vlm = qwen()
    original = {name: p.detach().clone() for name, p in vlm.model.state_dict().items()}
    names = parameter_names(vlm, [1])
    prefix = initial_prefix(vlm, 2, seed=0)
    config = EditConfig(optimizer="adamw", lr=1e-2, epochs=2, edit_batch_size=2)
    history = edit_parameters(vlm, _rows(vlm), names, prefix, config, state_path=tmp_path / "edit.pt",
                              log=lambda line: None)
    assert {"loss", "nll", "kl"} <= set(history[-1])
    changed = {name for name, value in vlm.model.state_dict().items() if not torch.equal(value, original[name])}
    assert changed == set(names)
    assert all(p.requires_grad for p in vlm.model.parameters())  # the flags are restored


def test_the_loop_resumed_from_its_state_file_ends_where_an_uninterrupted_one_does(tmp_path):
    def run(state_path, fail_at=None):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4))
        optimizer = torch.optim.AdamW([weight], lr=0.1)

        def loss_at(step):
            if step == fail_at:
                raise KeyboardInterrupt
            target = torch.arange(4.0) * (step % 3)
            return {"loss": ((weight - target) ** 2).sum()}

        optimise({"w": weight}, optimizer, loss_at, steps=12, state_path=state_path, stage="toy", save_every=4,
                 log_every=2, log=lambda line: None)
        return weight.detach()

    whole = run(tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", fail_at=9)
    assert (tmp_path / "b.pt").is_file()
    assert torch.equal(run(tmp_path / "b.pt"), whole) and not (tmp_path / "b.pt").exists()


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings,message", [
    ({"optimizer": "adam"}, "unknown --optimizer 'adam'"),
    ({"epochs": 0}, "--epochs 0: expected an integer >= 1"),
    ({"lr": 0.0}, "--lr 0.0: expected a learning rate > 0"),
    ({"nll_weight": 0.0, "kl_weight": 0.0}, "not both 0"),
])
def test_bad_edit_settings_are_refused(settings, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        EditConfig(**settings)


def test_bad_locate_inputs_are_refused(qwen):
    vlm = qwen()
    with pytest.raises(InputError, match="has no such module"):
        parameter_names(vlm, [0], ["mlp.down"])
    with pytest.raises(InputError, match="layer 7 is out of range"):
        parameter_names(vlm, [7])
    table = pd.DataFrame({"pair": [0], "layer": [0], "residual": [1.0], "update": [1.0]})
    with pytest.raises(InputError, match="unknown --score 'norm'"):
        select_layers(table, score="norm")
    with pytest.raises(InputError, match="empty response"):
        encode_responses(vlm, [(_image(), "Describe this image.", [])])
    with pytest.raises(InputError, match="prefix slots per row"):
        batch = encode_responses(vlm, _rows(vlm), [5, 6])
        with inserted(vlm, torch.zeros(3, vlm.embed_tokens.weight.shape[1]), batch.slots):
            pass
