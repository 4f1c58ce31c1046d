"""The server's library with the real packaged embedder (all-MiniLM-L6-v2): retrieval quality, guild
isolation, retention beyond the job store's cleanup, persistence across a reopen."""

from __future__ import annotations

import time

import numpy as np
import pytest
import pytest_asyncio

from mtm_bot.core.settings import Settings
from mtm_bot.jobs.job import Job, JobKind, JobState
from mtm_bot.jobs.library import Embedder, EmptyQuery, Library, title_line, track_text
from mtm_bot.jobs.store import JobStore

GUILD_A, GUILD_B = 111, 222

# (instruction, style, mood, instruments, block captions) as the refiner writes them, and a query that
# says the same thing in other words.
TRACKS = [
    (
        (
            "a festive brass carol with sleigh bells",
            "christmas brass carol",
            "joyful, festive",
            ["brass ensemble", "sleigh bells", "timpani"],
            [
                "A bright brass choir plays a carol melody over jingling sleigh bells.",
                "Trumpets and trombones swell into a triumphant holiday chorus with timpani rolls.",
            ],
        ),
        "sleigh bells and brass, festive",
    ),
    (
        (
            "lofi beat to study to",
            "lo-fi hip hop",
            "mellow, relaxed",
            ["rhodes piano", "vinyl crackle", "boom bap drums"],
            [
                "A dusty boom bap beat with a mellow Rhodes chord loop and vinyl crackle.",
                "Soft sidechained keys drift over a lazy swung groove.",
            ],
        ),
        "chill beats with crackly record noise for homework",
    ),
    (
        (
            "brutal thrash metal with blast beats",
            "thrash metal",
            "aggressive, furious",
            ["distorted electric guitar", "double kick drums", "bass guitar"],
            [
                "Fast palm-muted riffs on heavily distorted guitars over blast beats.",
                "A screaming guitar solo rips over pounding double kick drums.",
            ],
        ),
        "angry heavy guitars and very fast drumming",
    ),
    (
        (
            "deep space ambient drone",
            "dark ambient",
            "vast, contemplative",
            ["synth pads", "field recordings"],
            [
                "Slowly evolving synth pads hover in a wide reverb without any beat.",
                "A low drone swells and recedes like distant stars.",
            ],
        ),
        "slow beatless atmosphere floating through the cosmos",
    ),
    (
        (
            "smoky late night jazz club",
            "cool jazz",
            "intimate, smoky",
            ["upright bass", "brushed drums", "tenor saxophone"],
            [
                "A breathy tenor saxophone improvises over walking upright bass and brushed drums.",
                "The piano trio comps softly behind a relaxed sax melody.",
            ],
        ),
        "sax and walking bass in a dim bar after midnight",
    ),
    (
        (
            "epic orchestral battle music for a film trailer",
            "epic orchestral",
            "heroic, intense",
            ["full orchestra", "choir", "taiko drums"],
            [
                "Thundering taiko drums and staccato strings build tension.",
                "A massive choir and brass section erupt into a heroic theme.",
            ],
        ),
        "huge cinematic score with choir and war drums",
    ),
    (
        (
            "reggae with offbeat guitar skanks",
            "roots reggae",
            "laid-back, sunny",
            ["electric guitar", "bass", "organ"],
            [
                "Offbeat guitar skanks and a bubbling organ over a one-drop rhythm.",
                "A warm deep bassline carries the relaxed island groove.",
            ],
        ),
        "jamaican one drop groove with skanking guitar",
    ),
    (
        (
            "bluegrass hoedown with banjo and fiddle",
            "bluegrass",
            "lively, rustic",
            ["banjo", "fiddle", "acoustic guitar"],
            [
                "Rapid banjo rolls and a sawing fiddle drive a country hoedown.",
                "Flatpicked acoustic guitar trades licks with the mandolin.",
            ],
        ),
        "fast country picking with fiddle for a barn dance",
    ),
    (
        (
            "four on the floor deep house",
            "deep house",
            "groovy, hypnotic",
            ["kick drum", "hi-hats", "synth bass", "chord stabs"],
            [
                "A steady four-on-the-floor kick with shuffling hi-hats and a rolling synth bass.",
                "Filtered chord stabs open up over the hypnotic club groove.",
            ],
        ),
        "club dance track with a steady kick for the dancefloor",
    ),
    (
        (
            "gentle solo piano lullaby",
            "classical piano",
            "tender, sleepy",
            ["piano"],
            [
                "A soft solo piano plays a slow, gentle lullaby melody.",
                "Quiet arpeggios rock back and forth like a cradle.",
            ],
        ),
        "quiet piano to help a baby fall asleep",
    ),
    (
        (
            "flamenco guitar with hand claps",
            "flamenco",
            "passionate, fiery",
            ["nylon string guitar", "palmas", "cajon"],
            [
                "Rasgueado strums on a nylon guitar with sharp hand claps.",
                "A fiery Spanish guitar falseta races over the cajon.",
            ],
        ),
        "spanish acoustic guitar and clapping, passionate",
    ),
    (
        (
            "8-bit chiptune video game level",
            "chiptune",
            "playful, energetic",
            ["square wave lead", "noise drums", "arpeggios"],
            [
                "Bleepy square wave melodies and fast arpeggios like a retro game console.",
                "Noise channel drums push a bouncy platformer theme.",
            ],
        ),
        "retro nintendo style bleeps for a platform game",
    ),
    (
        (
            "gregorian chant in a cathedral",
            "sacred choral",
            "solemn, spiritual",
            ["male choir"],
            [
                "Monks sing a slow unison chant echoing in a stone cathedral.",
                "Plainsong voices rise and fall without accompaniment.",
            ],
        ),
        "medieval monks singing in a church",
    ),
    (
        (
            "funky slap bass groove",
            "funk",
            "funky, upbeat",
            ["slap bass", "clavinet", "horn section", "drums"],
            [
                "A popping slap bass line locks with a tight syncopated drum groove.",
                "Clavinet stabs and a punchy horn section answer each other.",
            ],
        ),
        "groovy seventies funk with popping bass and horns",
    ),
    (
        (
            "sad violin solo in the rain",
            "neoclassical",
            "melancholic, sorrowful",
            ["violin", "string ensemble"],
            ["A lone violin plays a mournful, slow melody.", "Soft strings swell beneath the weeping violin line."],
        ),
        "heartbreaking string melody, very sad",
    ),
    (
        (
            "dubstep with a heavy wobble bass drop",
            "dubstep",
            "aggressive, intense",
            ["wobble bass", "synths", "drums"],
            [
                "A half-time beat builds up to a massive wobbling bass drop.",
                "Growling, detuned synths wobble over crashing snares.",
            ],
        ),
        "filthy electronic bass drop with wobbles",
    ),
    (
        (
            "celtic folk jig with tin whistle",
            "celtic folk",
            "cheerful, lively",
            ["tin whistle", "bodhran", "fiddle"],
            [
                "A tin whistle dances through a quick Irish jig over bodhran.",
                "Fiddle and whistle trade a bright reel in a pub session.",
            ],
        ),
        "irish pub tune with penny whistle",
    ),
    (
        (
            "bossa nova on a beach at sunset",
            "bossa nova",
            "breezy, romantic",
            ["nylon guitar", "shaker", "soft vocals"],
            [
                "A gentle nylon guitar plays syncopated bossa nova chords with a shaker.",
                "Soft, breathy Brazilian vocals float over a relaxed samba rhythm.",
            ],
        ),
        "brazilian acoustic samba, relaxed and romantic",
    ),
    (
        (
            "punk rock anthem with shouted vocals",
            "punk rock",
            "rebellious, energetic",
            ["distorted guitar", "bass", "drums", "shouted vocals"],
            [
                "Three-chord power chords thrash at a breakneck tempo with gang vocals.",
                "Raw shouted choruses over fast, sloppy drumming.",
            ],
        ),
        "loud rebellious garage band, three chords",
    ),
    (
        (
            "synthwave night drive",
            "synthwave",
            "nostalgic, dreamy",
            ["analog synths", "gated reverb drums", "arpeggiator"],
            [
                "Pulsing analog arpeggios and gated snares evoke an eighties night drive.",
                "A neon-soaked synth lead glides over a retro bassline.",
            ],
        ),
        "80s retro synths cruising down a neon highway",
    ),
    (
        (
            "baroque harpsichord fugue",
            "baroque",
            "intricate, stately",
            ["harpsichord"],
            [
                "A harpsichord plays an intricate fugue with interweaving voices.",
                "Ornamented counterpoint unfolds in a stately baroque style.",
            ],
        ),
        "bach style keyboard counterpoint",
    ),
    (
        (
            "mariachi trumpets and guitars",
            "mariachi",
            "celebratory, proud",
            ["trumpets", "violins", "vihuela", "guitarron"],
            [
                "Bright mariachi trumpets blare over strummed vihuela and violins.",
                "A proud Mexican ranchera rhythm with guitarron bass.",
            ],
        ),
        "mexican band with trumpets for a fiesta",
    ),
    (
        (
            "tribal african drum circle",
            "west african percussion",
            "energetic, communal",
            ["djembe", "dunun", "shakers"],
            [
                "Interlocking djembe and dunun patterns in a lively drum circle.",
                "Polyrhythmic hand drums and shakers build in intensity.",
            ],
        ),
        "many hand drums playing polyrhythms together",
    ),
    (
        (
            "spooky halloween theme",
            "horror soundtrack",
            "eerie, creepy",
            ["music box", "theremin", "dissonant strings"],
            [
                "A detuned music box plays an eerie tune over creaking dissonant strings.",
                "A wavering theremin haunts a creepy graveyard atmosphere.",
            ],
        ),
        "creepy haunted house music for october",
    ),
    (
        (
            "country ballad with pedal steel",
            "country",
            "wistful, heartfelt",
            ["pedal steel guitar", "acoustic guitar", "vocals"],
            [
                "A crying pedal steel guitar over a slow acoustic country ballad.",
                "A heartfelt Nashville melody about a long lost love.",
            ],
        ),
        "slow nashville song with slide steel guitar",
    ),
    (
        (
            "drum and bass with fast breakbeats",
            "drum and bass",
            "energetic, urgent",
            ["breakbeats", "reese bass", "pads"],
            [
                "Chopped amen breakbeats race at 174 bpm over a rolling reese bass.",
                "Atmospheric pads float over the frantic jungle drums.",
            ],
        ),
        "jungle breaks at high speed with deep bass",
    ),
    (
        (
            "indian sitar raga at dawn",
            "hindustani classical",
            "meditative, serene",
            ["sitar", "tabla", "tanpura"],
            [
                "A sitar slowly unfolds a morning raga over a tanpura drone.",
                "Tabla joins with intricate rhythmic cycles.",
            ],
        ),
        "meditative indian classical music with tabla",
    ),
    (
        (
            "k-pop dance anthem",
            "k-pop",
            "bright, catchy",
            ["synths", "pop vocals", "trap hi-hats"],
            [
                "A glossy, catchy pop chorus with bright synths and trap hi-hats.",
                "A punchy dance break for an idol group choreography.",
            ],
        ),
        "korean idol group pop song with dance break",
    ),
    (
        (
            "steel drum calypso",
            "calypso",
            "cheerful, tropical",
            ["steel drums", "bass", "percussion"],
            [
                "Bright steel pans play a bouncy calypso melody.",
                "Caribbean percussion and bass keep a sunny, swaying rhythm.",
            ],
        ),
        "trinidad steelpan beach party",
    ),
    (
        (
            "string quartet wedding march",
            "classical chamber",
            "elegant, joyful",
            ["violins", "viola", "cello"],
            [
                "A string quartet plays an elegant, joyful processional.",
                "Graceful cello and violins lead a ceremony march.",
            ],
        ),
        "classy chamber strings for walking down the aisle",
    ),
    (
        (
            "gospel choir with hammond organ",
            "gospel",
            "uplifting, soulful",
            ["choir", "hammond organ", "piano"],
            [
                "A powerful gospel choir sings uplifting harmonies over a Hammond organ.",
                "Handclaps and soulful call-and-response fill the church.",
            ],
        ),
        "soulful church singers with organ, uplifting",
    ),
    (
        (
            "minimal techno in a warehouse",
            "minimal techno",
            "dark, hypnotic",
            ["kick drum", "percussion", "acid synth"],
            [
                "A relentless dry kick with sparse clicks and a squelching acid line.",
                "Hypnotic repetition in a dark industrial warehouse.",
            ],
        ),
        "dark repetitive underground rave with a 303 acid bass",
    ),
    (
        (
            "tropical house summer vibes",
            "tropical house",
            "carefree, sunny",
            ["marimba", "pan flute", "soft kick"],
            [
                "Plucky marimba and a pan flute hook over a relaxed house beat.",
                "Sunny, carefree summer melodies with a soft kick.",
            ],
        ),
        "easygoing summer dance tune with marimba",
    ),
    (
        (
            "blues shuffle with harmonica",
            "delta blues",
            "gritty, soulful",
            ["harmonica", "slide guitar", "shuffle drums"],
            ["A wailing harmonica over a gritty twelve-bar shuffle.", "Bottleneck slide guitar moans in a juke joint."],
        ),
        "twelve bar blues with a mouth harp",
    ),
]

RECALL_AT_1, RECALL_AT_3 = 0.8, 0.95


def finished_job(
    instruction: str,
    style: str,
    mood: str,
    instruments: list[str],
    captions: list[str],
    *,
    guild_id: int | None = GUILD_A,
    user_id: int = 7,
    finished_at: float | None = None,
) -> Job:
    """A delivered compose job as the worker stores it (the fields the library reads)."""
    job = Job.new(
        JobKind.COMPOSE,
        user_id=user_id,
        guild_id=guild_id,
        channel_id=55,
        instruction=instruction,
        attachment_size_limit=10 << 20,
        application_id=1,
        interaction_token="t",
    )
    job.state, job.finished_at = JobState.DONE, finished_at or time.time()
    blocks = [{"start": 10 * i, "end": 10 * i + 10, "caption": captions[i % len(captions)]} for i in range(3)]
    job.result_json = {
        "refined": {
            "style": style,
            "mood": mood,
            "tempo_bpm": 100,
            "instruments": instruments,
            "dynamics": "steady",
            "segments": [{"caption": c} for c in captions],
        },
        "blocks": blocks,
        "lines": [],
    }
    return job


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


@pytest_asyncio.fixture
async def library(embedder, tmp_path):
    settings = Settings(storage_dir=tmp_path, library_days=30)
    opened = await Library.open(settings, embedder)
    yield opened
    await opened.close()


def test_the_packaged_model_gives_unit_vectors_that_rank_meaning(embedder):
    vectors = embedder.embed(
        [
            "a festive brass carol with sleigh bells",
            "sleigh bells and brass, festive",
            "brutal thrash metal with blast beats",
        ]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.7 > 0.3 > vectors[0] @ vectors[2]


def test_retrieval_quality_on_paraphrased_queries(embedder):
    documents = embedder.embed([track_text(finished_job(*track)) for track, _ in TRACKS])
    queries = embedder.embed([query for _, query in TRACKS])
    ranks = []
    for i, scores in enumerate(queries @ documents.T):
        ranks.append(int((scores > scores[i]).sum()) + 1)  # 1 = the right track came first
    recall_1 = sum(r == 1 for r in ranks) / len(ranks)
    recall_3 = sum(r <= 3 for r in ranks) / len(ranks)
    missed = [(TRACKS[i][1], rank) for i, rank in enumerate(ranks) if rank > 1]
    print(f"\n{len(TRACKS)} tracks: recall@1 {recall_1:.3f}, recall@3 {recall_3:.3f}; not first: {missed}")
    assert len(TRACKS) >= 30
    assert recall_1 >= RECALL_AT_1 and recall_3 >= RECALL_AT_3, missed


async def test_search_finds_this_guilds_tracks_only(library):
    carol = finished_job(*TRACKS[0][0], guild_id=GUILD_A)
    metal = finished_job(*TRACKS[2][0], guild_id=GUILD_A)
    other_carol = finished_job(*TRACKS[0][0], guild_id=GUILD_B, user_id=8)
    for message_id, job in enumerate((carol, metal, other_carol), 1000):
        await library.add(job, message_id)

    matches = await library.search(GUILD_A, "sleigh bells and brass, festive")
    assert [m.job_id for m in matches] == [carol.id, metal.id]
    assert matches[0].message_id == 1000 and matches[0].channel_id == 55 and matches[0].guild_id == GUILD_A
    assert matches[0].title == title_line(carol) == "a festive brass carol with sleigh bells · christmas brass carol"
    assert 1.0 >= matches[0].similarity > matches[1].similarity
    assert [m.job_id for m in await library.search(GUILD_B, "thrash metal")] == [other_carol.id]
    assert await library.search(333, "anything") == []


async def test_a_blank_query_is_refused(library):
    with pytest.raises(EmptyQuery):
        await library.search(GUILD_A, "  \n ")


async def test_entries_outlive_the_audio_cleanup_and_a_restart_but_not_the_library_retention(embedder, tmp_path):
    settings = Settings(storage_dir=tmp_path, library_days=30)
    store = await JobStore.open(settings)
    library = await Library.open(settings, embedder)
    recent = finished_job(*TRACKS[4][0], finished_at=time.time() - 5 * 86400)  # 5 days: audio gone, entry kept
    old = finished_job(*TRACKS[5][0], finished_at=time.time() - 40 * 86400)  # beyond the 30 library days
    for job in (recent, old):
        await store.add(job)
        store.output_path(job.id).write_bytes(b"RIFF")
        await library.add(job, 42)
    assert [m.job_id for m in await library.search(GUILD_A, "jazz")] == [recent.id]  # the old one: pruned

    await store.cleanup(before=time.time() - 3 * 86400)  # the job store's retention: 3 days
    assert await store.get(recent.id) is None and not store.output_path(recent.id).exists()
    await library.close()
    await store.close()

    reopened = await Library.open(settings, embedder)
    try:
        assert [m.job_id for m in await reopened.search(GUILD_A, "saxophone in a bar")] == [recent.id]
    finally:
        await reopened.close()
