"""The fast MusicGen decode loop against transformers' `generate`, on tiny offline models (CPU)."""
import pytest
import torch

from bench.reference import reference_codes
from mtm_bot.errors import Cancelled
from mtm_bot.generator import MAX_TEXT_TOKENS, build_tiny_musicgen
from mtm_bot.musicgen_decode import MusicgenDecoder, Sampling
from tests.graph_inputs import copied_graph_inputs

GREEDY = Sampling(greedy=True)
CAPTION = "a warm jazz carol with sleigh bells, upright bass and brushed drums"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and do not stall on a busy CI core's spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["melody", "small"])
def tiny(request):
    model, tokenizer = build_tiny_musicgen(request.param)
    return request.param, with_trained_weight_scales(model), tokenizer


@torch.no_grad()
def with_trained_weight_scales(model):
    """Re-draw the decoder and projections at the scale of trained weights (std 1/sqrt(fan_in)).

    At transformers' init (std 0.02) the random decoder barely reads its conditioning: a different
    melody leaves greedy codes unchanged, so an equivalence test could not notice a lost melody.
    """
    rng = torch.Generator().manual_seed(0)
    parts = [model.decoder, getattr(model, "enc_to_dec_proj", None), getattr(model, "audio_enc_to_dec_proj", None)]
    for module in (m for part in parts if part is not None for m in part.modules()):
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0, module.in_features ** -0.5, generator=rng)
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0, 1, generator=rng)
    return model


def inputs(kind, tokenizer, captions=(CAPTION,), prompt_frames=0, seed=0):
    """Tokenized captions, a chroma melody (melody model) and an optional audio prompt, seeded."""
    rng = torch.Generator().manual_seed(seed)
    text = tokenizer(list(captions), return_tensors="pt", padding=True)
    batch = len(captions)
    features = None
    if kind == "melody":  # a one-hot chroma per frame, like a real melody
        notes = torch.randint(0, 12, (batch, 120), generator=rng)
        features = torch.nn.functional.one_hot(notes, 12).float()
    prompt = torch.randint(0, 64, (batch, 4, prompt_frames), generator=rng) if prompt_frames else None
    return dict(input_ids=text.input_ids, attention_mask=text.attention_mask, input_features=features,
                prompt_codes=prompt)


@pytest.mark.parametrize("prompt_frames", [0, 13])
def test_greedy_codes_equal_transformers_generate(tiny, prompt_frames):
    kind, model, tokenizer = tiny
    kw = inputs(kind, tokenizer, prompt_frames=prompt_frames)
    ours = MusicgenDecoder(model, max_frames=200).generate_codes(**kw, new_frames=40, sampling=GREEDY)
    reference = reference_codes(model, **kw, new_frames=40, guidance_scale=3.0)

    assert ours.shape == (1, 4, prompt_frames + 40)
    assert torch.equal(ours, reference)
    if prompt_frames:  # the continuation starts with the prompt itself
        assert torch.equal(ours[..., :prompt_frames], kw["prompt_codes"])
    assert ours[..., prompt_frames:].unique().numel() > 8  # real music codes, not a constant


def test_greedy_equal_for_a_padded_batch_and_without_guidance(tiny):
    kind, model, tokenizer = tiny
    kw = inputs(kind, tokenizer, captions=(CAPTION, "lo-fi piano"), prompt_frames=5)
    decoder = MusicgenDecoder(model, max_frames=200)
    for scale in (3.0, 1.0):
        ours = decoder.generate_codes(**kw, new_frames=25, sampling=Sampling(guidance_scale=scale, greedy=True))
        assert torch.equal(ours, reference_codes(model, **kw, new_frames=25, guidance_scale=scale))


def test_caption_and_melody_change_the_codes(tiny):
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=200)
    base = inputs(kind, tokenizer)
    codes = decoder.generate_codes(**base, new_frames=30, sampling=GREEDY)
    other_caption = {**base, **inputs(kind, tokenizer, captions=("energetic rock song with loud drums",))}
    other_caption["input_features"] = base["input_features"]
    assert not torch.equal(codes, decoder.generate_codes(**other_caption, new_frames=30, sampling=GREEDY))
    if kind == "melody":
        other_melody = {**base, "input_features": inputs(kind, tokenizer, seed=1)["input_features"]}
        assert not torch.equal(codes, decoder.generate_codes(**other_melody, new_frames=30, sampling=GREEDY))


def test_sampling_is_reproducible_per_seed(tiny):
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=200)
    kw = inputs(kind, tokenizer, prompt_frames=4)

    def sample(seed, sampling=Sampling()):
        return decoder.generate_codes(**kw, new_frames=30, sampling=sampling,
                                      generator=torch.Generator().manual_seed(seed))

    first = sample(7)
    assert torch.equal(first, sample(7))
    assert not torch.equal(first, sample(8))
    # Filters that leave one candidate turn sampling into greedy decoding.
    greedy = decoder.generate_codes(**kw, new_frames=30, sampling=GREEDY)
    assert not torch.equal(first, greedy)
    assert torch.equal(sample(7, Sampling(top_k=1)), greedy)
    assert torch.equal(sample(8, Sampling(top_p=1e-6, temperature=0.7)), greedy)


def test_on_step_reports_every_frame_and_its_exception_stops_the_loop(tiny):
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=200)
    kw = inputs(kind, tokenizer, prompt_frames=3)
    calls = []
    full = decoder.generate_codes(**kw, new_frames=20, sampling=GREEDY,
                                  on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 20) for i in range(1, 21)]

    calls.clear()

    def cancel_at_five(done, total):
        calls.append(done)
        if done == 5:
            raise Cancelled("The job was cancelled.")

    with pytest.raises(Cancelled):
        decoder.generate_codes(**kw, new_frames=20, sampling=GREEDY, on_step=cancel_at_five)
    assert calls == [1, 2, 3, 4, 5]
    assert torch.equal(decoder.generate_codes(**kw, new_frames=20, sampling=GREEDY), full)  # the next job is clean


def test_a_reused_decoder_gives_what_a_fresh_one_gives(tiny):
    """Static buffers carry nothing from one block to the next (longer caption, prompt, melody)."""
    kind, model, tokenizer = tiny
    reused = MusicgenDecoder(model, max_frames=200)
    reused.generate_codes(**inputs(kind, tokenizer, captions=(CAPTION + ", " + CAPTION,), prompt_frames=30, seed=2),
                          new_frames=50, sampling=GREEDY)
    short = inputs(kind, tokenizer, captions=("lo-fi piano",))
    fresh = MusicgenDecoder(model, max_frames=200)
    assert torch.equal(reused.generate_codes(**short, new_frames=20, sampling=GREEDY),
                       fresh.generate_codes(**short, new_frames=20, sampling=GREEDY))


def test_block_longer_than_the_context_is_refused(tiny):
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=50)
    with pytest.raises(ValueError, match="1..50"):
        decoder.generate_codes(**inputs(kind, tokenizer, prompt_frames=20), new_frames=31)


def test_decode_step_traces_as_one_graph(tiny):
    """What CUDA graph capture needs: torch.compile(fullgraph=True) traces the step without breaks."""
    kind, model, tokenizer = tiny
    kw = inputs(kind, tokenizer, prompt_frames=2)
    eager = MusicgenDecoder(model, max_frames=100)
    traced = MusicgenDecoder(model, max_frames=100, compile=True)  # the CUDA configuration ...
    traced.step = torch.compile(traced.decode_one_token, backend="eager", fullgraph=True)  # ... without inductor
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for sampling in (GREEDY, Sampling()):
        runs = [d.generate_codes(**kw, new_frames=12, sampling=sampling, generator=torch.Generator().manual_seed(3))
                for d in (eager, traced)]
        assert torch.equal(*runs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per sampling mode, none per step


def test_warming_up_at_the_longest_description_leaves_no_reallocation_for_shorter_ones():
    model, _ = build_tiny_musicgen("melody")
    decoder = MusicgenDecoder(model, max_frames=64, compile=False)
    decoder.warmup(text_tokens=MAX_TEXT_TOKENS)
    cache = decoder.k_cache
    ids = torch.ones(1, 40, dtype=torch.long)
    decoder.generate_codes(input_ids=ids, attention_mask=torch.ones_like(ids), new_frames=4)
    assert decoder.k_cache is cache  # same buffers: a captured CUDA graph would stay valid


def test_the_captured_step_copies_only_its_per_step_inputs(tiny):
    """The weights and caches must be static for a CUDA graph, or each replay would copy them all."""
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=64, compile=True)
    decoder.step = torch.compile(decoder.decode_one_token, backend="aot_eager", fullgraph=True)
    with copied_graph_inputs() as copied:
        decoder.generate_codes(**inputs(kind, tokenizer), new_frames=3, generator=torch.Generator().manual_seed(0))
    assert sorted(copied) == ["L['cache_pos']", "L['noise']", "L['pos']"]


def test_fusing_the_projections_stores_no_weight_twice(tiny):
    kind, model, tokenizer = tiny

    def weight_bytes(*tensors) -> int:  # the memory behind the model's parameters and `tensors`
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (*model.parameters(), *tensors)}
        return sum(storages.values())

    before = weight_bytes()
    decoder = MusicgenDecoder(model, max_frames=64)
    assert weight_bytes(*decoder.qkv_weights, decoder.heads_weight) == before
    reference = reference_codes(model, **inputs(kind, tokenizer), new_frames=8, greedy=True, guidance_scale=3.0)
    assert torch.equal(decoder.generate_codes(**inputs(kind, tokenizer), new_frames=8, sampling=GREEDY), reference)
