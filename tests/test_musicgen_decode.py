"""The fast MusicGen decode loop against transformers' `generate`, on tiny offline models (CPU)."""

import dataclasses

import pytest
import torch

from bench.reference import reference_codes
from mtm_bot.core.errors import Cancelled
from mtm_bot.stages.generator import build_tiny_musicgen
from mtm_bot.stages.musicgen_decode import BlockRequest, MusicgenDecoder
from mtm_bot.stages.sampling import Sampling
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
            module.weight.normal_(0, module.in_features**-0.5, generator=rng)
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0, 1, generator=rng)
    return model


def inputs(kind, tokenizer, captions=(CAPTION,), prompt_frames=0, seed=0, codebooks=4):
    """Tokenized captions, a chroma melody (melody model) and an optional audio prompt, seeded."""
    rng = torch.Generator().manual_seed(seed)
    text = tokenizer(list(captions), return_tensors="pt", padding=True)
    batch = len(captions)
    features = None
    if kind == "melody":  # a one-hot chroma per frame, like a real melody
        notes = torch.randint(0, 12, (batch, 120), generator=rng)
        features = torch.nn.functional.one_hot(notes, 12).float()
    prompt = torch.randint(0, 64, (batch, codebooks, prompt_frames), generator=rng) if prompt_frames else None
    return dict(
        input_ids=text.input_ids, attention_mask=text.attention_mask, input_features=features, prompt_codes=prompt
    )


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


def request(
    kind, tokenizer, caption=CAPTION, prompt_frames=0, new_frames=30, melody=True, seed=0, on_step=None, codebooks=4
):
    """One block's request (seeded melody, prompt and generator) and the inputs transformers takes for it."""
    kw = inputs(kind, tokenizer, captions=(caption,), prompt_frames=prompt_frames, seed=seed, codebooks=codebooks)
    if not melody:
        kw["input_features"] = None
    block = BlockRequest(
        kw["input_ids"],
        kw["attention_mask"],
        new_frames,
        kw["input_features"],
        kw["prompt_codes"],
        torch.Generator().manual_seed(seed),
        on_step,
    )
    return block, kw


def mixed_batch(kind, tokenizer, on_step=None):
    """Different descriptions (one past the 128-token text bucket), a first block and continuations (one
    from the bot's 160-frame prompt), with and without melody, different lengths; `on_step` on the second."""
    specs = [
        dict(caption=CAPTION, new_frames=40, seed=1),
        dict(caption="lo-fi piano", prompt_frames=160, new_frames=25, melody=False, seed=2, on_step=on_step),
        dict(caption=", ".join([CAPTION] * 6), prompt_frames=13, new_frames=33, seed=3),
    ]
    return [request(kind, tokenizer, **spec) for spec in specs]


def with_own_generator(block: BlockRequest) -> BlockRequest:
    """The same request with a copy of its generator, to decode it a second time."""
    return dataclasses.replace(block, generator=torch.Generator().set_state(block.generator.get_state()))


def decode_recording_logits(decoder, blocks, sampling=Sampling()):
    """generate_batch's results and, per block, the logits of its rows at each of its steps (prefill first)."""
    calls = []
    logits = decoder.net.logits

    def record(hidden):
        out = logits(hidden)
        calls.append(out.clone())
        return out

    decoder.net.logits = record  # an instance attribute over the method
    results = decoder.generate_batch(blocks, sampling)
    del decoder.net.logits
    rows = 2 if sampling.guidance_scale > 1 else 1
    prefills, steps = calls[: len(blocks)], calls[len(blocks) :]  # a prefill per block, then the batch's steps
    per_block = []
    for slot, (block, prefill) in enumerate(zip(blocks, prefills)):
        decode_steps = block.new_frames + decoder.num_codebooks - 2  # all its steps but the prefill
        own_rows = [step[slot * rows : (slot + 1) * rows] for step in steps[:decode_steps]]
        per_block.append(torch.stack([prefill] + own_rows))
    return results, per_block


def test_greedy_blocks_of_a_mixed_batch_equal_transformers_generate_alone(tiny):
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=200)
    for scale in (3.0, 1.0):
        batch = mixed_batch(kind, tokenizer)
        codes = decoder.generate_batch([block for block, _ in batch], Sampling(guidance_scale=scale, greedy=True))
        for ours, (block, kw) in zip(codes, batch):
            assert torch.equal(ours, reference_codes(model, **kw, new_frames=block.new_frames, guidance_scale=scale))


def test_sampled_blocks_decode_to_the_same_bits_alone_and_batched(tiny):
    """Same codes and generator state as alone, and underneath the same logits to the last bit: on the CPU
    a block rounds alike alone and batched (see the module doc), not merely samples alike."""
    kind, model, tokenizer = tiny
    batch = [block for block, _ in mixed_batch(kind, tokenizer)]
    alone = [with_own_generator(block) for block in batch]
    expected = [decode_recording_logits(MusicgenDecoder(model, max_frames=200), [block]) for block in alone]
    codes, logits = decode_recording_logits(MusicgenDecoder(model, max_frames=200), batch)
    for i, ((solo_codes,), (solo_logits,)) in enumerate(expected):
        assert codes[i].shape == (1, 4, batch[i].prompt_frames + batch[i].new_frames)
        assert torch.equal(codes[i], solo_codes)
        assert torch.equal(logits[i], solo_logits)
        assert torch.equal(batch[i].generator.get_state(), alone[i].generator.get_state())  # no step drew more


def test_a_cancelled_block_leaves_the_batch_and_the_others_decode_on(tiny):
    kind, model, tokenizer = tiny
    calls = []

    def cancel_at_five(done, total):
        calls.append((done, total))
        if done == 5:
            raise Cancelled("The job was cancelled.")

    batch = [block for block, _ in mixed_batch(kind, tokenizer, on_step=cancel_at_five)]
    alone = [with_own_generator(block) for block in batch]
    expected = [MusicgenDecoder(model, max_frames=200).generate_batch([block])[0] for block in alone]
    calls.clear()
    results = MusicgenDecoder(model, max_frames=200).generate_batch(batch)
    assert isinstance(results[1], Cancelled) and isinstance(expected[1], Cancelled)
    assert calls == [(i, 25) for i in range(1, 6)]
    assert torch.equal(results[0], expected[0]) and torch.equal(results[2], expected[2])
    for block, solo in zip(batch, alone):  # the cancelled block drew no noise after its cancel
        assert torch.equal(block.generator.get_state(), solo.generator.get_state())


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
        return decoder.generate_codes(
            **kw, new_frames=30, sampling=sampling, generator=torch.Generator().manual_seed(seed)
        )

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
    full = decoder.generate_codes(
        **kw, new_frames=20, sampling=GREEDY, on_step=lambda done, total: calls.append((done, total))
    )
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
    reused.generate_codes(
        **inputs(kind, tokenizer, captions=(CAPTION + ", " + CAPTION,), prompt_frames=30, seed=2),
        new_frames=50,
        sampling=GREEDY,
    )
    short = inputs(kind, tokenizer, captions=("lo-fi piano",))
    fresh = MusicgenDecoder(model, max_frames=200)
    assert torch.equal(
        reused.generate_codes(**short, new_frames=20, sampling=GREEDY),
        fresh.generate_codes(**short, new_frames=20, sampling=GREEDY),
    )


def test_a_malformed_request_is_refused_before_any_block_starts(tiny):
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=50)
    with pytest.raises(ValueError, match="1..50"):
        decoder.generate_codes(**inputs(kind, tokenizer, prompt_frames=20), new_frames=31)
    calls = []
    good = request(kind, tokenizer, new_frames=10, on_step=lambda done, total: calls.append(done))[0]
    too_long = request(kind, tokenizer, prompt_frames=20, new_frames=31)[0]
    with pytest.raises(ValueError, match="1..50"):
        decoder.generate_batch([good, too_long])
    two_rows = inputs(kind, tokenizer, captions=(CAPTION, "lo-fi piano"))
    with pytest.raises(ValueError, match="one block"):
        decoder.generate_batch([good, BlockRequest(two_rows["input_ids"], two_rows["attention_mask"], 10)])
    assert calls == []


def recording_compile(decoder, graphs: list):
    """The CUDA configuration's torch.compile of the step, with a backend that records each graph's
    inputs and runs it eagerly (no inductor)."""

    def record(graph_module, example_inputs):
        graphs.append(example_inputs)
        return graph_module.forward

    torch._dynamo.reset()
    return torch.compile(decoder.decode_one_token, backend=record, fullgraph=True)


def test_decode_step_traces_as_one_static_graph_per_bucket(tiny):
    """What CUDA graph capture needs: torch.compile(fullgraph=True) traces the step without breaks, and
    each batch-size bucket gets a graph of its own static shapes, not one graph with a symbolic batch."""
    kind, model, tokenizer = tiny
    eager = MusicgenDecoder(model, max_frames=100)
    traced = MusicgenDecoder(model, max_frames=100, compile=True)
    graphs = []
    traced.step = recording_compile(traced, graphs)
    for sampling in (GREEDY, Sampling()):
        for blocks in (1, 3):  # buckets of 2 and 4 slots (a CPU batch has at least 4 rows)
            runs = [
                decoder.generate_batch(
                    [request(kind, tokenizer, prompt_frames=2, new_frames=12, seed=i)[0] for i in range(blocks)],
                    sampling,
                )
                for decoder in (eager, traced)
            ]
            assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert len(graphs) == 4  # per sampling mode, one per bucket, none per step
    assert all(isinstance(value, torch.Tensor) for inputs in graphs for value in inputs)  # no SymInt


def test_warmup_sizes_and_captures_every_bucket_so_no_request_recompiles():
    model, tokenizer = build_tiny_musicgen("melody")
    decoder = MusicgenDecoder(model, max_frames=64, compile=True)
    graphs = []
    decoder.step = recording_compile(decoder, graphs)
    decoder.warmup(max_batch=4)
    assert len(graphs) == 2  # the buckets of 2 and 4 slots
    cache = decoder.buffers.k_cache
    for blocks in (1, 3, 4):
        decoder.generate_batch([request("melody", tokenizer, new_frames=4, seed=i)[0] for i in range(blocks)])
    assert len(graphs) == 2
    assert decoder.buffers.k_cache is cache  # same buffers: the captured CUDA graphs stay valid


def test_the_captured_step_copies_none_of_its_inputs(tiny):
    """The weights, caches and per-step inputs (positions, noise) must be static for a CUDA graph, or each
    replay would copy them."""
    kind, model, tokenizer = tiny
    decoder = MusicgenDecoder(model, max_frames=64, compile=True)
    decoder.step = torch.compile(decoder.decode_one_token, backend="aot_eager", fullgraph=True)
    with copied_graph_inputs() as copied:
        decoder.generate_batch([request(kind, tokenizer, new_frames=3, seed=i)[0] for i in range(3)])
    assert copied == []
    with copied_graph_inputs() as control:  # the check sees a copied input where there is one
        torch.compile(lambda noise: noise * 2, backend="aot_eager", fullgraph=True)(torch.ones(3))
    assert control == ["L['noise']"]


def test_fusing_the_projections_stores_no_weight_twice(tiny):
    kind, model, tokenizer = tiny

    def weight_bytes(*tensors) -> int:  # the memory behind the model's parameters and `tensors`
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*model.parameters(), *tensors)
        }
        return sum(storages.values())

    before = weight_bytes()
    decoder = MusicgenDecoder(model, max_frames=64)
    assert weight_bytes(*decoder.net.qkv_weights, decoder.net.heads_weight) == before
    reference = reference_codes(model, **inputs(kind, tokenizer), new_frames=8, greedy=True, guidance_scale=3.0)
    assert torch.equal(decoder.generate_codes(**inputs(kind, tokenizer), new_frames=8, sampling=GREEDY), reference)


def decode_staggered(decoder, arrivals, max_blocks):
    """decode_blocks with the blocks of `arrivals[0]` at first and the others handed in once the loop has run
    the steps their key says, as jobs arriving one after another hand them to a running loop; returns their
    codes in arrival order and how many blocks decoded at each step."""
    order = [block for at in sorted(arrivals) for block in arrivals[at]]
    later = [(at, block) for at in sorted(arrivals) if at > 0 for block in arrivals[at]]
    results, running = {}, []
    step = decoder.step

    def counting(*args):
        running.append(int(decoder.batch.active.sum()))
        return step(*args)

    def handed(block):
        index = next(i for i, b in enumerate(order) if b is block)
        return block, lambda codes: results.__setitem__(index, codes)

    def admit(room):
        taken = []
        while later and later[0][0] <= len(running) and len(taken) < room:
            taken.append(handed(later.pop(0)[1]))
        return taken

    decoder.step = counting
    try:
        decoder.decode_blocks([handed(block) for block in arrivals[0]], max_blocks=max_blocks, admit=admit)
    finally:
        decoder.step = step
    return [results[i] for i in range(len(order))], running


def test_a_running_loop_grows_to_take_every_block_its_limit_allows(tiny):
    """Jobs arriving one after another: the loop started for one block takes the second, third and fourth
    between steps (moving to larger buckets), and each block's codes are still those it gets alone."""
    kind, model, tokenizer = tiny
    blocks = [request(kind, tokenizer, caption=f"{CAPTION} {i}", new_frames=30, seed=i)[0] for i in range(4)]
    alone = [MusicgenDecoder(model, max_frames=200).generate_batch([with_own_generator(b)])[0] for b in blocks]
    codes, running = decode_staggered(
        MusicgenDecoder(model, max_frames=200),
        {0: blocks[:1], 3: blocks[1:2], 6: blocks[2:3], 9: blocks[3:]},
        max_blocks=4,
    )
    assert max(running) == 4  # all four decoded together once the last had joined
    assert running[:3] == [1, 1, 1] and running[10] == 4
    for ours, theirs in zip(codes, alone):
        assert torch.equal(ours, theirs)


def test_a_loop_never_decodes_more_blocks_than_its_limit(tiny):
    """max_batch 3 decodes in the bucket of 4 slots, but never runs a fourth block: it waits for a slot."""
    kind, model, tokenizer = tiny
    blocks = [request(kind, tokenizer, new_frames=20, seed=i)[0] for i in range(4)]
    codes, running = decode_staggered(
        MusicgenDecoder(model, max_frames=200), {0: blocks[:1], 2: blocks[1:]}, max_blocks=3
    )
    assert max(running) == 3 and len(codes) == 4
    assert running.index(3) < running.index(1, running.index(3))  # the fourth ran alone after the others


# Stereo checkpoints (8 codebooks, left and right interleaved, a delay per pair) and the large layout.


@pytest.fixture(
    scope="module",
    params=[("melody", True, False), ("small", True, False), ("melody", False, True), ("melody", True, True)],
    ids=["stereo-melody", "stereo-small", "melody-large", "stereo-melody-large"],
)
def layout(request):
    kind, stereo, large = request.param
    model, tokenizer = build_tiny_musicgen(kind, stereo=stereo, large=large)
    return kind, with_trained_weight_scales(model), tokenizer


@pytest.mark.parametrize("prompt_frames", [0, 13])
@pytest.mark.parametrize("melody", [True, False], ids=["melody", "no melody"])
def test_stereo_and_large_layouts_decode_what_transformers_generates(layout, prompt_frames, melody):
    kind, model, tokenizer = layout
    K = model.decoder.num_codebooks
    block, kw = request(kind, tokenizer, prompt_frames=prompt_frames, new_frames=40, melody=melody, codebooks=K)
    ours = MusicgenDecoder(model, max_frames=200).generate_codes(**kw, new_frames=40, sampling=GREEDY)
    assert ours.shape == (1, K, prompt_frames + 40)
    assert torch.equal(ours, reference_codes(model, **kw, new_frames=40, guidance_scale=3.0))
    if prompt_frames:
        assert torch.equal(ours[..., :prompt_frames], kw["prompt_codes"])


def test_stereo_blocks_batched_decode_the_bits_they_decode_alone(layout):
    kind, model, tokenizer = layout
    K = model.decoder.num_codebooks
    specs = [
        dict(new_frames=30, seed=1),
        dict(caption="lo-fi piano", prompt_frames=160, new_frames=25, seed=2),
        dict(caption=", ".join([CAPTION] * 6), prompt_frames=13, new_frames=33, melody=False, seed=3),
    ]
    batch = [request(kind, tokenizer, codebooks=K, **spec)[0] for spec in specs]
    alone = [MusicgenDecoder(model, max_frames=200).generate_batch([with_own_generator(b)])[0] for b in batch]
    for ours, theirs in zip(MusicgenDecoder(model, max_frames=200).generate_batch(batch), alone):
        assert torch.equal(ours, theirs)
    frames = []
    MusicgenDecoder(model, max_frames=200).generate_codes(
        **inputs(kind, tokenizer, codebooks=K), new_frames=6, on_step=lambda done, total: frames.append(done)
    )
    assert frames == [1, 2, 3, 4, 5, 6]  # a frame counts once both channels' last codebooks have it


def test_a_mono_prompt_is_refused_by_a_stereo_model_before_any_block_starts():
    model, tokenizer = build_tiny_musicgen("melody", stereo=True)
    decoder = MusicgenDecoder(model, max_frames=200)
    mono, _ = request("melody", tokenizer, prompt_frames=10, codebooks=4)
    stereo, _ = request("melody", tokenizer, prompt_frames=10, codebooks=8, seed=1)
    with pytest.raises(ValueError, match="the prompt has 4 codebooks; this stereo model has 8"):
        decoder.generate_batch([stereo, mono])
