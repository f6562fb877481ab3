"""Offline, seeded generator of RACE-schema reading-comprehension rows whose answers live only in the passage.

Each article describes a handful of invented residents of an invented place. Every resident gets randomly drawn
attributes (job, home city, favourite colour, pet and its name, instrument, favourite food, number of siblings,
number of languages, age, the year they arrived); values of one attribute are all different within an article, and
every fact is rendered from that single table, so a person never receives contradictory facts. A question asks one
attribute of one person (or which person has a given attribute value); the three distractors are the *same*
attribute of other residents who appear in the same passage, so every option is plausible and every option occurs
in the article. Nothing outside the article can tell the options apart: names, cities and pets are invented and all
values are drawn independently of each other.

Rows follow the Hub schema of ``ehovy/race`` (``example_id, article, question, options, answer``) plus a
``question_type`` field (``who, what, where, which, how_many``) that formatting code ignores.

Pure Python and fast: about 4,000 rows per second on one core. ``generate_race_rows(n, seed)`` always returns the
same rows for the same arguments, and row ``i`` does not depend on ``n`` (each row has its own random stream).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

ANSWER_LETTERS = ("A", "B", "C", "D")

LENGTH_PRESETS: dict[str, tuple[int, int]] = {
    "short": (80, 150),
    "medium": (150, 260),
    "long": (260, 400),
    "mixed": (80, 400),
}
"""Article length ranges in words; the target of each article is drawn uniformly inside the range."""

QUESTION_TYPES = ("who", "what", "where", "which", "how_many")

# --------------------------------------------------------------------------------------------------------------------
# Vocabularies. They are pairwise disjoint (checked at import) so that no value can be read as another attribute.

FIRST_NAMES = (
    "Adele", "Bruno", "Celia", "Dario", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lionel",
    "Mara", "Nikolai", "Odette", "Pavel", "Quinn", "Rosalind", "Stellan", "Tamsin", "Ulric", "Vera", "Wendell",
    "Xenia", "Yusuf", "Zora", "Anselm", "Beatrix", "Cosimo", "Dagny", "Emeric", "Fenna", "Gideon", "Hester",
    "Ivo", "Jorun", "Kasimir", "Leocadia", "Matthias", "Nerys", "Oswin", "Philippa", "Rainer", "Sabine",
    "Tobias", "Ursula", "Valentin", "Wilma", "Yannick", "Zelda", "Aurelio", "Bettina", "Clemens", "Dorothea",
    "Elmar", "Frida", "Gustav", "Henrike", "Ilse", "Jasper",
)  # fmt: skip
_SURNAME_HEADS = (
    "Brann", "Cald", "Dorv", "Elst", "Farr", "Gell", "Harv", "Isk", "Jell", "Korr", "Lund", "Mert", "Noll",
    "Orst", "Pell", "Rusk", "Sand", "Tarr", "Umb", "Vell", "Wust", "Yarr", "Zell", "Aub",
)  # fmt: skip
_SURNAME_TAILS = ("ock", "ari", "enko", "ing", "ova", "strom", "amy", "ett", "isch", "ard", "owe", "ani")
_PLACE_HEADS = (
    "Ash", "Bram", "Cor", "Dun", "Eld", "Fal", "Glen", "Hol", "Kil", "Lin", "Mor", "Nether", "Oak", "Pen",
    "Quar", "Rav", "Stan", "Thorn", "Ul", "Wil", "Yel", "Kest", "Brise", "Tal",
)  # fmt: skip
_PLACE_TAILS = ("brook", "haven", "mere", "ford", "wick", "stead", "mouth", "holt", "gate", "bury", "moor", "vale")
_SETTING_KINDS = (
    "small town by a lake", "fishing village on a rocky coast", "market town in the hills",
    "quiet village at the edge of a forest", "busy river port", "mountain village above a long valley",
    "town on a windy island", "farming village among wide fields",
)  # fmt: skip

JOBS = (
    "baker", "carpenter", "nurse", "pilot", "librarian", "potter", "teacher", "tailor", "mechanic", "gardener",
    "painter", "dentist", "chemist", "journalist", "architect", "electrician", "plumber", "farmer",
    "photographer", "translator", "surgeon", "florist", "jeweller", "blacksmith", "bus driver", "lawyer",
    "banker", "chef", "shepherd", "engineer", "beekeeper", "mapmaker", "watchmaker", "bookbinder",
    "vet", "pharmacist", "sailor", "astronomer", "locksmith", "glassblower",
)  # fmt: skip
COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey", "black", "white", "silver",
    "gold", "teal", "violet", "crimson", "amber", "navy", "turquoise", "lilac",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "goat", "pony", "ferret", "canary",
    "lizard", "hedgehog", "duck", "snake", "guinea pig", "donkey", "mouse", "chinchilla", "gecko",
)  # fmt: skip
PET_NAMES = (
    "Biscuit", "Pepper", "Mango", "Noodle", "Ziggy", "Clover", "Pickle", "Waffles", "Juniper", "Toffee",
    "Bramble", "Pip", "Nutmeg", "Sprout", "Marble", "Rusty", "Domino", "Tango", "Bumble", "Cricket", "Fudge",
    "Jellybean", "Kiwi", "Lolly", "Muffin", "Pebble", "Smudge", "Truffle", "Whisker", "Zephyr",
)  # fmt: skip
INSTRUMENTS = (
    "piano", "violin", "cello", "flute", "guitar", "trumpet", "harp", "clarinet", "banjo", "accordion",
    "saxophone", "oboe", "ukulele", "trombone", "harmonica", "mandolin",
)  # fmt: skip
FOODS = (
    "lentil soup", "apple pie", "pancakes", "curry", "dumplings", "roast chicken", "mushroom risotto",
    "fish stew", "potato salad", "lemon cake", "noodle soup", "cheese omelette", "rice pudding", "grilled corn",
    "spinach pie", "bean chili", "plum tart", "tomato pasta",
)  # fmt: skip
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")

_FILLER = (
    "{town} is a {kind}.",
    "Life in {town} moves slowly, and most people know their neighbours by name.",
    "Visitors often say that {town} feels far away from the rest of the world.",
    "Every spring, the people of {town} hold a fair that lasts for a whole weekend.",
    "The main street of {town} is narrow, and its old stone houses lean towards each other.",
    "In winter the roads to {town} are sometimes closed for days at a time.",
    "Nobody remembers exactly when the first houses of {town} were built.",
    "A single road leads into {town}, and the bus comes only twice a day.",
    "On summer evenings, people sit outside their doors and talk until it gets dark.",
    "The weather here changes quickly, so people always carry a coat.",
    "There is a small square in the middle of the town where children play after school.",
    "Most shops close early on weekdays, and on holidays nothing is open at all.",
    "The town council meets once a month in a hall next to the old well.",
    "People here like to say that news travels faster than the wind.",
    "The nearest hospital is an hour away, so neighbours help each other whenever they can.",
    "Many families have lived here for generations, but newcomers are welcomed warmly.",
)
_OPENERS = (
    "This is a short account of some of the people who live there.",
    "Here are a few of the people who call it home.",
    "The following paragraphs introduce some of its residents.",
    "Several interesting people live there, and this passage describes them.",
)
_CLOSERS = (
    "Together, these neighbours make {town} a lively place to live.",
    "Each of them would tell you that {town} is the best place in the world.",
    "Anyone who visits {town} is likely to meet at least one of them.",
    "Their stories are only a small part of the life of {town}.",
    "Few of them plan to leave {town} any time soon.",
)
_INTROS = (
    "{full} is one of the best-known people in {town}.",
    "{full} lives on a quiet street near the centre of {town}.",
    "Next, there is {full}.",
    "Another resident is {full}.",
    "{full} has a house close to the edge of {town}.",
    "Everyone in {town} knows {full}.",
)

# Statements: one attribute per sentence, always naming the person, so that every fact is explicit.
_STATEMENTS: dict[str, tuple[str, ...]] = {
    "job": ("{first} works as {job_a}.", "By profession, {first} is {job_a}.", "{first} earns a living as {job_a}."),
    "city": ("{first} grew up in {city}.", "{first} was born and raised in {city}.", "{first} is originally from {city}."),
    "colour": ("{first}'s favourite colour is {colour}.", "Of all colours, {first} likes {colour} best."),
    "pet": ("{first} has a {animal} called {pet}.", "{first} keeps a {animal} named {pet} as a pet."),
    "instrument": ("{first} plays the {instrument}.", "In the evenings, {first} practises the {instrument}."),
    "food": ("{first}'s favourite food is {food}.", "If {first} could choose any meal, it would be {food}."),
    "siblings": ("{first} has {siblings} brothers and sisters.", "{first} grew up with {siblings} siblings."),
    "languages": ("{first} speaks {languages} languages.", "{first} can speak {languages} different languages."),
    "age": ("{first} is {age} years old.", "{first} turned {age} this year."),
    "year": ("{first} moved to {town} in {year}.", "{first} arrived in {town} in {year}.", "{first} came to live in {town} in {year}."),
}  # fmt: skip

# Question forms: (question type, attribute, question template, what the answer is: the attribute value or "name").
_QUESTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("who", "job", "Who works as {job_a}?", "name"),
    ("who", "city", "Who grew up in {city}?", "name"),
    ("who", "pet", "Who has a {animal} as a pet?", "name"),
    ("who", "instrument", "Who plays the {instrument}?", "name"),
    ("who", "colour", "Whose favourite colour is {colour}?", "name"),
    ("what", "job", "What does {ref} do for a living?", "job"),
    ("what", "food", "What is {ref}'s favourite food?", "food"),
    ("what", "pet", "What is the name of {ref}'s pet?", "pet"),
    ("where", "city", "Where did {ref} grow up?", "city"),
    ("where", "city", "Where is {ref} originally from?", "city"),
    ("which", "colour", "Which colour does {ref} like best?", "colour"),
    ("which", "pet", "Which animal does {ref} keep as a pet?", "animal"),
    ("which", "instrument", "Which instrument does {ref} play?", "instrument"),
    ("which", "year", "In which year did {ref} move to {town}?", "year"),
    ("how_many", "siblings", "How many brothers and sisters does {ref} have?", "siblings"),
    ("how_many", "languages", "How many languages does {ref} speak?", "languages"),
    ("how_many", "age", "How many years old is {ref}?", "age"),
)

_ATTRIBUTES = tuple(_STATEMENTS)
_NON_WORD = re.compile(r"\W+")


def _check_vocabularies() -> None:
    groups = {
        "first names": FIRST_NAMES,
        "jobs": JOBS,
        "colours": COLOURS,
        "animals": ANIMALS,
        "pet names": PET_NAMES,
        "instruments": INSTRUMENTS,
        "foods": FOODS,
        "numbers": NUMBER_WORDS,
    }
    seen: dict[str, str] = {}
    for group, words in groups.items():
        if len(set(words)) != len(words):
            raise AssertionError(f"duplicate entry in synthetic RACE vocabulary {group}")
        for word in words:
            key = word.lower()
            if key in seen:
                raise AssertionError(f"{word!r} is in both {seen[key]} and {group}")
            seen[key] = group


_check_vocabularies()


def _indefinite(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


@dataclass
class _Person:
    first: str
    surname: str
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def full(self) -> str:
        return f"{self.first} {self.surname}"


def _fields(person: _Person, town: str) -> dict[str, object]:
    values: dict[str, object] = {"first": person.first, "full": person.full, "town": town}
    for key, value in person.facts.items():
        if key == "pet":
            values["animal"], values["pet"] = value  # type: ignore[misc]
        else:
            values[key] = value
    if "job" in values:
        values["job_a"] = _indefinite(str(values["job"]))
    return values


def _value_of(person: _Person, answer_kind: str) -> str:
    if answer_kind == "name":
        return person.full
    if answer_kind in ("animal", "pet"):
        animal, pet = person.facts["pet"]  # type: ignore[misc]
        return animal if answer_kind == "animal" else pet
    return str(person.facts[answer_kind])


def _place_names(rng: random.Random, k: int) -> list[str]:
    names: set[str] = set()
    while len(names) < k:
        names.add(rng.choice(_PLACE_HEADS) + rng.choice(_PLACE_TAILS))
    out = sorted(names)
    rng.shuffle(out)
    return out


def _draw_people(rng: random.Random, k: int, cities: Sequence[str]) -> list[_Person]:
    firsts = rng.sample(FIRST_NAMES, k)
    surnames: set[str] = set()
    while len(surnames) < k:
        surnames.add(rng.choice(_SURNAME_HEADS) + rng.choice(_SURNAME_TAILS))
    surname_list = sorted(surnames)
    rng.shuffle(surname_list)
    people = [_Person(first, surname) for first, surname in zip(firsts, surname_list, strict=True)]
    # Every attribute gets k distinct values, one per person: no two people share a value, so "who ..." questions
    # have a single answer and a person's facts come from one table (never contradictory).
    draws = {
        "job": rng.sample(JOBS, k),
        "city": list(cities),
        "colour": rng.sample(COLOURS, k),
        "pet": list(zip(rng.sample(ANIMALS, k), rng.sample(PET_NAMES, k), strict=True)),
        "instrument": rng.sample(INSTRUMENTS, k),
        "food": rng.sample(FOODS, k),
        "siblings": rng.sample(NUMBER_WORDS, k),
        "languages": rng.sample(NUMBER_WORDS, k),
        "age": [str(a) for a in rng.sample(range(19, 80), k)],
        "year": [str(y) for y in rng.sample(range(1965, 2021), k)],
    }
    for i, person in enumerate(people):
        person.facts = {attr: values[i] for attr, values in draws.items()}
    return people


def _word_count(sentences: Sequence[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def _normalize(text: str) -> str:
    return " " + " ".join(w for w in _NON_WORD.split(text.lower()) if w) + " "


def _mentions(normalized_text: str, value: str) -> bool:
    """Whether ``value`` occurs as whole words in a text normalized by `_normalize`."""
    return _normalize(value) in normalized_text


def _resolve_length(length: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(length, str):
        if length not in LENGTH_PRESETS:
            raise ValueError(
                f"length must be one of {sorted(LENGTH_PRESETS)} or a (min_words, max_words) pair, got {length!r}"
            )
        return LENGTH_PRESETS[length]
    lo, hi = (int(v) for v in length)
    if not 1 <= lo <= hi:
        raise ValueError(f"length range must satisfy 1 <= min_words <= max_words, got {length!r}")
    return lo, hi


def _resolve_residents(residents: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if residents is None:
        return None
    lo, hi = (residents, residents) if isinstance(residents, int) else (int(v) for v in residents)
    if not 1 <= lo <= hi <= len(FIRST_NAMES) - 3:
        raise ValueError(f"residents must be an int or (min, max) with 1 <= min <= max, got {residents!r}")
    return lo, hi


def _make_row(
    rng: random.Random,
    words: tuple[int, int],
    question_types: Sequence[str],
    residents: tuple[int, int] | None = None,
) -> tuple[dict[str, object], list[str]]:
    """One row and the options that must *not* occur in its article (distractors drawn from outside it)."""
    target = rng.randint(*words)
    if residents is None:
        # More people in longer articles (4 always: the answer plus three distractors, all in the passage).
        n_people = rng.randint(4, max(4, min(7, 4 + (target - 80) // 70)))
    else:
        n_people = rng.randint(*residents)
    # With fewer than 4 residents, the missing distractors are the attribute values of "absent" people: drawn
    # from the same table (so they are plausible, distinct values of the asked attribute) but never written into
    # the article, so exactly one option occurs in the passage attached to the asked person.
    n_absent = max(0, 4 - n_people)
    places = _place_names(rng, n_people + n_absent + 1)
    town, cities = places[0], places[1:]
    everyone = _draw_people(rng, n_people + n_absent, cities)
    people, absent = everyone[:n_people], everyone[n_people:]
    kind = rng.choice(_SETTING_KINDS)

    # Question type first (uniform over the allowed types), then one of its forms.
    qtype = rng.choice(question_types)
    _, q_attr, q_template, answer_kind = rng.choice([q for q in _QUESTIONS if q[0] == qtype])
    target_idx = rng.randrange(n_people)
    others = [i for i in range(n_people) if i != target_idx]
    distractor_idx = rng.sample(others, min(3, len(others)))

    # Which facts are stated: the asked attribute for everyone (so the three distractors also occur in the
    # passage), then further facts drawn at random until the article reaches its target length.
    sentences = {}
    for i, person in enumerate(people):
        values = _fields(person, town)
        for attr in _ATTRIBUTES:
            sentences[(i, attr)] = rng.choice(_STATEMENTS[attr]).format(**values)
    stated: list[list[str]] = [[q_attr] for _ in range(n_people)]
    pool = [(i, a) for i in range(n_people) for a in _ATTRIBUTES if a != q_attr]
    rng.shuffle(pool)

    intro = [_FILLER[0].format(town=town, kind=kind), rng.choice(_OPENERS)]
    fillers = [f.format(town=town) for f in _FILLER[1:]]
    rng.shuffle(fillers)
    closing = [rng.choice(_CLOSERS).format(town=town)] if rng.random() < 0.6 else []
    person_intros = [rng.choice(_INTROS).format(full=p.full, town=town) for p in people]

    count = _word_count(intro) + _word_count(closing) + _word_count(person_intros)
    count += sum(len(sentences[(i, q_attr)].split()) for i in range(n_people))
    while count < target and (pool or fillers):
        if fillers and (not pool or rng.random() < 0.15):
            intro.append(fillers.pop())
            count += len(intro[-1].split())
            continue
        i, attr = pool.pop()
        stated[i].insert(rng.randint(0, len(stated[i])), attr)  # anywhere: the asked fact has no fixed slot
        count += len(sentences[(i, attr)].split())

    paragraphs = [" ".join(intro)]
    order = list(range(n_people))
    rng.shuffle(order)
    for i in order:
        paragraphs.append(" ".join([person_intros[i]] + [sentences[(i, a)] for a in stated[i]]))
    if closing:
        paragraphs.append(" ".join(closing))
    article = "\n".join(paragraphs)

    target_person = people[target_idx]
    ref = target_person.full if rng.random() < 0.5 else target_person.first
    question = q_template.format(ref=ref, **{k: v for k, v in _fields(target_person, town).items() if k != "ref"})
    answer_text = _value_of(target_person, answer_kind)
    distractors = [_value_of(people[i], answer_kind) for i in distractor_idx]
    absent_values = [_value_of(p, answer_kind) for p in absent]
    if absent_values:  # in-passage and absent distractors take uniformly random slots
        distractors += absent_values
        rng.shuffle(distractors)
    letter_idx = rng.randrange(4)
    options = distractors[:letter_idx] + [answer_text] + distractors[letter_idx:]
    row = {
        "article": article,
        "question": question,
        "options": options,
        "answer": ANSWER_LETTERS[letter_idx],
        "question_type": qtype,
    }
    return row, absent_values


def _is_clean(row: dict[str, object], absent: Sequence[str] = ()) -> bool:
    options = row["options"]
    assert isinstance(options, list)
    question, article = _normalize(str(row["question"])), _normalize(str(row["article"]))
    if len(set(o.lower() for o in options)) != 4:
        return False
    # No option may be named by the question itself; every option but the absent distractors must occur in the
    # article, and the absent ones must not (else they could be the stated value of someone else).
    return all(not _mentions(question, o) and _mentions(article, o) != (o in absent) for o in options)


def generate_race_rows(
    n: int,
    seed: int = 0,
    *,
    length: str | tuple[int, int] = "mixed",
    question_types: Sequence[str] | None = None,
    split: str = "train",
    start: int = 0,
    residents: int | tuple[int, int] | None = None,
) -> list[dict[str, object]]:
    """Generate ``n`` RACE-schema rows.

    Args:
        n: number of rows.
        seed: base seed. The same ``(seed, split, length, index)`` always gives the same row, independent of ``n``
            (different length ranges are different random streams, so their rows are unrelated).
        length: a preset name from ``LENGTH_PRESETS`` (``"short"``, ``"medium"``, ``"long"``, ``"mixed"``) or a
            ``(min_words, max_words)`` range; each article's target length is drawn uniformly in the range (the
            article can overshoot the target by one sentence).
        question_types: subset of ``QUESTION_TYPES`` to draw from (default: all).
        split: name mixed into the random stream and the ids, so ``train``/``validation``/``test`` differ.
        start: index of the first row (to extend an existing set without regenerating it).
        residents: number of people in each article, an int or a ``(min, max)`` range (default: 4-7, more in
            longer articles). Below 4, the missing distractors are values of the asked attribute that the article
            never states, so the question is answered by finding the one option the passage attributes to the
            person asked about. Fewer residents make the lookup easier for a small model (fewer competing facts).

    Returns:
        A list of dicts with ``example_id, article, question, options (4 str), answer ("A".."D"), question_type``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    words = _resolve_length(length)
    people_range = _resolve_residents(residents)
    types = tuple(question_types) if question_types is not None else QUESTION_TYPES
    unknown = set(types) - set(QUESTION_TYPES)
    if unknown or not types:
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types!r}")
    rows = []
    for index in range(start, start + n):
        stream = f"trl-plw-synthetic-race:{seed}:{split}:{words[0]}-{words[1]}:{index}"
        if people_range is not None:
            stream += f":residents={people_range[0]}-{people_range[1]}"
        rng = random.Random(stream)
        for _ in range(100):
            row, absent = _make_row(rng, words, types, people_range)
            if _is_clean(row, absent):
                break
        else:  # pragma: no cover - the checks fail only on rare word collisions
            raise RuntimeError(f"could not draw a clean synthetic row for index {index}")
        rows.append({"example_id": f"synthetic-{split}-{seed}-{index:06d}", **row})
    return rows
