import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import main
from ldm.checkpoint import keys_from_sd, read_state_dict
from ldm.modules.embedding_manager import EmbeddingManager, load_embeddings_into, read_embeddings
from ldm.util import instantiate_from_config, load_model_from_config

from .conftest import TINY_INFERENCE

TI_CONFIG = "configs/tiny/v1-finetune-textual-inversion.yaml"
STAR, CIRCLE = 265, 7117  # CLIP ids of "*" and "circle"


def _encoder(seed=0):
    torch.manual_seed(seed)
    return instantiate_from_config(OmegaConf.load(TINY_INFERENCE).model.params.cond_stage_config)


def _twin(encoder):
    """An independent encoder with the same weights and no hooks (the oracle side)."""
    twin = _encoder(seed=1)
    twin.load_state_dict(encoder.state_dict())
    return twin


def test_one_vector_equals_an_edited_vocabulary_row():
    enc = _encoder()
    manager = EmbeddingManager(["*"], ["circle"]).attach(enc)
    (vector,) = manager.embedding_parameters()
    assert vector.shape == (1, 64) and vector.requires_grad
    with torch.no_grad():
        vector.copy_(torch.randn(1, 64))
    oracle = _twin(enc)
    with torch.no_grad():
        oracle.transformer.embeddings.token_embedding.weight[STAR] = vector[0]
    prompts = ["a photo of *", "* next to * on grass", "no placeholder here"]
    with torch.no_grad():
        assert torch.equal(enc.encode(prompts), oracle.encode(prompts))
        assert torch.equal(enc.encode(prompts[2:]), _twin(enc).encode(prompts[2:]))  # untouched without placeholder


def test_several_vectors_shift_the_prompt_like_the_reference():
    enc = _encoder()
    manager = EmbeddingManager(["*"], ["circle"], num_vectors_per_token=3).attach(enc)
    (vectors,) = manager.embedding_parameters()
    with torch.no_grad():
        vectors.copy_(torch.randn(3, 64))
    # Oracle: three unused vocabulary rows hold the vectors, and the ids are spliced by hand.
    spare = [1000, 1001, 1002]
    oracle = _twin(enc)
    with torch.no_grad():
        oracle.transformer.embeddings.token_embedding.weight[spare] = vectors
    long_tail = " ".join(["grass"] * 73)  # fills the 77 positions: the splice must cut the end off
    for prompt in ["a * on grass", "* and * again", f"a * {long_tail}"]:
        ids = enc.tokenize([prompt])[0].tolist()
        spliced = []
        for t in ids:
            spliced += spare if t == STAR else [t]
        expected_ids = torch.tensor([spliced[:77]])
        with torch.no_grad():
            assert torch.equal(enc.encode([prompt]), oracle.encode_tokens(expected_ids))
        expanded = [STAR if t in spare else t for t in spliced[:77]]
        assert manager.expand_ids(enc.tokenize([prompt]))[0].tolist() == expanded


def test_only_the_vectors_get_gradients():
    enc = _encoder()
    manager = EmbeddingManager(["*"], ["circle"]).attach(enc)
    enc.encode(["a photo of *"]).square().sum().backward()
    assert manager.embedding_parameters()[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_start_value_follows_loaded_weights_with_the_reference_position_quirk(tiny_ckpt):
    config = OmegaConf.load(TI_CONFIG)
    model = load_model_from_config(config, tiny_ckpt, verbose=False)
    assert not any(k.startswith("embedding_manager") for k in model.state_dict())  # SD checkpoints load strictly
    emb = model.cond_stage_model.transformer.embeddings
    (vector,) = model.embedding_manager.embedding_parameters()
    # The reference ran the initializer token alone through CLIP's embedding layer: token + position-0 embedding.
    assert torch.equal(vector[0], emb.token_embedding.weight[CIRCLE] + emb.position_embedding.weight[0])
    with torch.no_grad():
        vector.add_(1.0)
    trained = vector.detach().clone()
    model.load_state_dict(model.state_dict())
    assert torch.equal(vector, trained)  # a vector that moved is not reset when base weights are loaded again
    config.model.params.personalization_config.params.init_with_position_embedding = False
    plain = load_model_from_config(config, tiny_ckpt, verbose=False)
    assert torch.equal(plain.embedding_manager.embedding_parameters()[0][0], emb.token_embedding.weight[CIRCLE])


def test_save_load_round_trip_and_weights_only_file(tmp_path):
    enc = _encoder()
    manager = EmbeddingManager(["*"], ["circle"], num_vectors_per_token=2).attach(enc)
    with torch.no_grad():
        manager.embedding_parameters()[0].copy_(torch.randn(2, 64))
    path = tmp_path / "embeddings.pt"
    manager.save(path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"string_to_token", "string_to_param"}
    assert state["string_to_token"]["*"].dim() == 0 and int(state["string_to_token"]["*"]) == STAR
    assert torch.equal(state["string_to_param"]["*"], manager.embedding_parameters()[0].detach())
    fresh = _twin(enc)
    loaded = load_embeddings_into(fresh, path)
    assert loaded.embedding_parameters()[0].shape == (2, 64)
    prompts = ["a photo of *", "* on grass"]
    with torch.no_grad():
        assert torch.equal(fresh.encode(prompts), enc.encode(prompts))


def test_reference_parameterdict_file_loads_and_code_is_refused(tmp_path):
    params = nn.ParameterDict({"*": nn.Parameter(torch.randn(1, 64))})
    torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": params}, tmp_path / "ref.pt")
    tokens, vectors = read_embeddings(tmp_path / "ref.pt")
    assert tokens == {"*": STAR} and torch.equal(vectors["*"], params["*"].detach())

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"string_to_token": {"*": Payload()}, "string_to_param": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused because unpickling them could run code"):
        read_embeddings(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_inputs_are_one_line_errors(tmp_path):
    enc = _encoder()
    with pytest.raises(ValueError, match=r"placeholder string 'teddybear' is 2 CLIP tokens \['teddy', 'bear</w>'\]"):
        EmbeddingManager(["teddybear"]).attach(enc)
    with pytest.raises(ValueError, match="initializer word 'teddybear' is 2 CLIP tokens"):
        EmbeddingManager(["*"], ["teddybear"]).attach(enc)
    EmbeddingManager(["*"]).attach(enc)
    with pytest.raises(ValueError, match="already has a Textual Inversion embedding manager"):
        EmbeddingManager(["sks"]).attach(enc)
    with pytest.raises(ValueError, match="embeddings file not found"):
        read_embeddings(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="per_image_tokens and progressive_words are not supported"):
        EmbeddingManager(["*"], per_image_tokens=True)


def test_vectors_follow_dtype_moves_of_the_model():
    holder = nn.Module()
    holder.manager = EmbeddingManager(["*"], ["circle"]).attach(_encoder())
    holder.to(torch.float64)
    assert holder.manager.embedding_parameters()[0].dtype == torch.float64
    assert list(holder.parameters()) == []  # kept out of parameters() and state_dict()


def test_textual_inversion_training_changes_only_its_vector(tiny_ckpt, example_data, tmp_path):
    args = ["--base", TI_CONFIG, "-t", "--actual_resume", tiny_ckpt, "--data_root", example_data, "-l", str(tmp_path),
            "lightning.trainer.max_steps=2", "lightning.modelcheckpoint.params.every_n_train_steps=2",
            "lightning.callbacks.image_logger.params.batch_frequency=0", "data.params.train.params.repeats=2"]
    logdir, model = main.run(*main.get_parser().parse_known_args(args))
    trainable = model.trainable_parameters()
    assert sum(p.numel() for p in trainable) == 64  # one vector of the tiny text width
    base = keys_from_sd(read_state_dict(tiny_ckpt))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    emb = model.cond_stage_model.transformer.embeddings
    start = emb.token_embedding.weight[CIRCLE] + emb.position_embedding.weight[0]
    assert not torch.equal(trainable[0][0], start)
    tokens, vectors = read_embeddings(os.path.join(logdir, "checkpoints", "adapter", "embeddings.pt"))
    assert tokens == {"*": STAR} and torch.equal(vectors["*"], trainable[0].detach())


@pytest.mark.parametrize("kwargs, message", [
    ({"placeholder_strings": []}, "placeholder_strings must be distinct and at least one, got []"),
    ({"placeholder_strings": ["*", "*"]}, "placeholder_strings must be distinct and at least one, got ['*', '*']"),
    ({"initializer_words": ["circle", "square"]}, "2 initializer_words for 1 placeholder_strings"),
    ({"num_vectors_per_token": 0}, "num_vectors_per_token must be >= 1, got 0"),
    ({"per_image_tokens": True}, "per_image_tokens and progressive_words are not supported"),
])
def test_bad_manager_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError) as e:
        EmbeddingManager(**kwargs)
    assert message in str(e.value)
