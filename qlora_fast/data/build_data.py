"""Writes the data shipped with qlora_fast (run `python -m qlora_fast.data.build_data` to rebuild;
the output is deterministic).

- `corpus.txt`: plain prose used to pretrain the tiny built-in model. It states the facts, sums,
  conversions and spellings that the instruction set later asks about, but never in the
  instruction format, so instruction tuning has to teach the format and the stop token.
- `instructions_train.jsonl` / `instructions_heldout.jsonl`: {"instruction", "output", "task"}
  pairs from templates: arithmetic, string transforms, unit conversions and short facts. The
  held-out split uses words, numbers and facts that no training pair uses.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = """apple river stone cloud bread chair table light green water house plant tiger horse
sheep mouse music paper glass field bridge storm candle garden window pencil forest island
rocket violin silver copper winter summer spring autumn orange lemon melon cherry grape peach
mango planet comet moon star ocean desert valley castle tower market doctor farmer pilot
sailor baker singer dancer yellow purple basket bottle button carpet dragon engine feather
flower hammer jacket kettle ladder magnet needle pillow rabbit saddle ticket wallet zebra
camel eagle falcon lizard monkey panda parrot salmon turtle whale cat dog fox owl bee ant
cow pig hen egg cup pen box bag hat map key car bus sun sky sea ice snow rain wind fire
gold iron wood sand salt milk tea rice corn bean nut cake soup jam honey""".split()

CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
    ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"),
    ("Chile", "Santiago"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Portugal", "Lisbon"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Turkey", "Ankara"),
]
SOUNDS = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("sheep", "baa"), ("duck", "quack"),
    ("owl", "hoot"), ("lion", "roar"), ("snake", "hiss"), ("bee", "buzz"), ("horse", "neigh"),
    ("pig", "oink"), ("mouse", "squeak"), ("frog", "croak"), ("crow", "caw"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
    ("open", "closed"), ("old", "new"), ("left", "right"), ("high", "low"), ("wet", "dry"),
    ("early", "late"), ("full", "empty"), ("light", "dark"), ("hard", "soft"), ("happy", "sad"),
    ("strong", "weak"), ("rich", "poor"), ("thick", "thin"), ("loud", "quiet"), ("first", "last"),
]
COLORS = [
    ("grass", "green"), ("snow", "white"), ("coal", "black"), ("the sky", "blue"),
    ("a banana", "yellow"), ("a tomato", "red"), ("an orange", "orange"), ("milk", "white"),
    ("a lemon", "yellow"), ("blood", "red"), ("a leaf", "green"), ("the sea", "blue"),
]
UNITS = [  # (long name, short, target short, factor)
    ("kilometres", "km", "m", 1000), ("metres", "m", "cm", 100), ("kilograms", "kg", "g", 1000),
    ("litres", "l", "ml", 1000), ("minutes", "min", "s", 60), ("hours", "h", "min", 60),
]
UNIT_NAMES = {"km": "kilometres", "m": "metres", "cm": "centimetres", "kg": "kilograms", "g": "grams",
              "l": "litres", "ml": "millilitres", "min": "minutes", "s": "seconds", "h": "hours"}


def _split(items, heldout_fraction, rng):
    items = list(items)
    rng.shuffle(items)
    n = max(1, int(len(items) * heldout_fraction))
    return items[n:], items[:n]


def _cap_task(rows, tasks, limit, rng):
    """Keep at most `limit` rows of the given tasks (a random subset), order otherwise kept."""
    picked = [i for i, r in enumerate(rows) if r[0] in tasks]
    drop = set(picked) - set(rng.sample(picked, min(limit, len(picked))))
    return [r for i, r in enumerate(rows) if i not in drop]


def build(seed: int = 1234):
    rng = random.Random(seed)
    train_words, held_words = _split(WORDS, 0.2, rng)
    train_caps, held_caps = _split(CAPITALS, 0.25, rng)
    train_sounds, held_sounds = _split(SOUNDS, 0.25, rng)
    train_opp, held_opp = _split(OPPOSITES, 0.25, rng)
    train_cols, held_cols = _split(COLORS, 0.25, rng)
    pairs = [(a, b) for a in range(0, 30) for b in range(0, 30)]
    train_sums, held_sums = _split(pairs, 0.1, rng)

    def word_tasks(words):
        out = []
        for w in words:
            out.append(("upper", f"Write the word {w} in capital letters.", w.upper()))
            out.append(("reverse", f"Spell the word {w} backwards.", w[::-1]))
            out.append(("first", f"What is the first letter of {w}?", w[0]))
            out.append(("repeat", f"Repeat the word {w} twice.", f"{w} {w}"))
            out.append(("length", f"How many letters are in {w}?", str(len(w))))
        return out

    def fact_tasks(caps, sounds, opps, cols):
        out = []
        for c, k in caps:
            out.append(("fact", f"What is the capital of {c}?", k))
        for a, s in sounds:
            out.append(("fact", f"What sound does a {a} make?", s))
        for a, b in opps:
            out.append(("fact", f"What is the opposite of {a}?", b))
            out.append(("fact", f"What is the opposite of {b}?", a))
        for t, c in cols:
            out.append(("fact", f"What color is {t}?", c))
        return out

    def sum_tasks(pairs):
        out = []
        for a, b in pairs:
            out.append(("add", f"What is {a} + {b}?", str(a + b)))
            if a >= b:
                out.append(("subtract", f"What is {a} - {b}?", str(a - b)))
        return out

    def unit_tasks(values):
        out = []
        for _, short, target, factor in UNITS:
            for v in values:
                out.append(("convert", f"Convert {v} {short} to {target}.", f"{v * factor} {target}"))
        return out

    train_values, held_values = _split(range(1, 40), 0.2, rng)
    train = (
        word_tasks(train_words)
        + fact_tasks(train_caps, train_sounds, train_opp, train_cols)
        + sum_tasks(train_sums)
        + unit_tasks(train_values)
    )
    held = (
        word_tasks(held_words)
        + fact_tasks(held_caps, held_sounds, held_opp, held_cols)
        + sum_tasks(held_sums)
        + unit_tasks(held_values)
    )
    rng.shuffle(train)
    rng.shuffle(held)
    # Sums would otherwise be most of the set; keep a share so every task is seen often.
    # (A separate RNG: the corpus below stays exactly as before.)
    sub = random.Random(seed + 1)
    train = _cap_task(train, ("add", "subtract"), 300, sub)
    held = _cap_task(held, ("add", "subtract"), 40, sub)[:240]

    # The corpus knows every fact, word and number (both splits) in prose form.
    sentences = []
    for c, k in CAPITALS:
        sentences += [f"The capital of {c} is {k}.", f"{k} is the capital city of {c}."]
    for a, s in SOUNDS:
        sentences += [f"A {a} says {s}.", f"The sound a {a} makes is {s}."]
    for a, b in OPPOSITES:
        sentences += [
            f"The opposite of {a} is {b}.",
            f"The opposite of {b} is {a}.",
            f"{a.capitalize()} and {b} are opposites.",
        ]
    for t, c in COLORS:
        sentences += [f"The color of {t} is {c}.", f"{t[0].upper() + t[1:]} is {c}."]
    for w in WORDS:
        sentences += [
            f"The word {w} in capital letters is {w.upper()}.",
            f"The word {w} spelled backwards is {w[::-1]}.",
            f"The word {w} starts with the letter {w[0]}.",
            f"The word {w} has {len(w)} letters.",
            f"{w.capitalize()}, {w}, {w}.",
        ]
    for a in range(30):
        for b in range(30):
            sentences.append(f"{a} plus {b} is {a + b}.")
            if a >= b:
                sentences.append(f"{a} minus {b} is {a - b}.")
    for long, short, target, factor in UNITS:
        sentences.append(f"One {long[:-1]} is {factor} {UNIT_NAMES[target]}.")
        for v in range(1, 40):
            sentences.append(f"{v} {short} is {v * factor} {target}.")
    rng.shuffle(sentences)
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    corpus = "\n".join(paragraphs) + "\n"
    return corpus, train, held


def main():
    corpus, train, held = build()
    with open(os.path.join(HERE, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write(corpus)
    for name, rows in (("instructions_train.jsonl", train), ("instructions_heldout.jsonl", held)):
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            for task, instruction, output in rows:
                f.write(json.dumps({"instruction": instruction, "output": output, "task": task}) + "\n")
    print(f"corpus {len(corpus)} chars, {len(train)} train pairs, {len(held)} held-out pairs")


if __name__ == "__main__":
    main()
