"""The benchmark's fixed chat dataset, and synthetic examples of a chosen token length.

``bench/data/chat.jsonl`` is written by this module and kept in the repository, so every run (and
every machine) trains on byte-identical data. Regenerate it with::

    python -m bench.dataset            # rewrites bench/data/chat.jsonl
    python -m bench.dataset --check    # verifies the kept file matches the generator

All text here is written for this benchmark. The mix is deliberate: many short Q&A pairs (where
padding to a long batch-mate costs most), medium explanations, multi-turn exchanges, a few long
answers of a few hundred tokens, and custom system prompts on about a third of the examples (the
rest get the chat template's default system prompt).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DATA_PATH = Path(__file__).resolve().parent / "data" / "chat.jsonl"
SEED = 20240611

SYSTEM_PROMPTS = [
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a friendly tutor who explains things simply.",
    "You are a careful technical assistant for software engineers.",
    "You are a helpful cooking assistant.",
    "You are a travel planning assistant. Be practical.",
]

# (question, answer): short factual exchanges.
SHORT_QA = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What gas do plants absorb from the air?",
     "Plants absorb carbon dioxide and use it, with sunlight and water, to make sugars."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many minutes are in three hours?", "Three hours contain 180 minutes."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Is a tomato a fruit or a vegetable?",
     "Botanically a tomato is a fruit, but in cooking it is usually treated as a vegetable."),
    ("What does HTTP stand for?", "HTTP stands for Hypertext Transfer Protocol."),
    ("How many bits are in a byte?", "A byte has eight bits."),
    ("What is the square root of 144?", "The square root of 144 is 12."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What is the main language spoken in Brazil?", "The main language spoken in Brazil is Portuguese."),
    ("How long does light from the Sun take to reach Earth?",
     "Sunlight takes about eight minutes and twenty seconds to reach Earth."),
    ("What is a prime number?",
     "A prime number is a whole number greater than one whose only divisors are one and itself."),
    ("What unit is used to measure electrical resistance?", "Electrical resistance is measured in ohms."),
    ("How many continents are there?", "By the most common convention there are seven continents."),
    ("What does RAM do in a computer?",
     "RAM holds the data and programs a computer is using right now, so the processor can reach them quickly."),
    ("What is the opposite of 'ancient'?", "The opposite of 'ancient' is 'modern'."),
    ("Name a mammal that can fly.", "The bat is a mammal that can truly fly."),
    ("What is 15 percent of 200?", "Fifteen percent of 200 is 30."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the past tense of 'run'?", "The past tense of 'run' is 'ran'."),
    ("Which vitamin does sunlight help the body make?", "Sunlight helps the skin make vitamin D."),
    ("What is a haiku?",
     "A haiku is a short Japanese poem of three lines, traditionally with five, seven and five syllables."),
    ("What is the tallest animal?", "The giraffe is the tallest animal; adults can reach almost six metres."),
    ("What does 'ASAP' mean?", "'ASAP' means 'as soon as possible'."),
    ("Which metal is liquid at room temperature?", "Mercury is the metal that is liquid at room temperature."),
    ("What is the plural of 'mouse'?", "The plural of 'mouse' is 'mice', or 'mouses' for computer mice in some usage."),
]

# Programmatic short exchanges: answers are computed, so they are always right.
def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


def _conversion(rng: random.Random) -> tuple[str, str]:
    km = rng.choice([3, 5, 8, 10, 12, 21, 42])
    return (f"How many miles is {km} kilometres?",
            f"{km} kilometres is about {km * 0.621371:.1f} miles, since one kilometre is roughly 0.62 miles.")


MEDIUM = [
    ("Why do we see lightning before we hear thunder?",
     "Light and sound leave the lightning strike at the same moment, but they travel at very different "
     "speeds. Light moves at about 300,000 kilometres per second, so it reaches you almost instantly. "
     "Sound moves at roughly 343 metres per second in air. That is why you can estimate the distance of a "
     "storm: count the seconds between the flash and the thunder and divide by three to get kilometres."),
    ("What is the difference between a list and a tuple in Python?",
     "Both hold ordered sequences of values. A list is mutable: you can append, remove or change items after "
     "creating it. A tuple is immutable: once created, its contents cannot change. Because tuples cannot "
     "change, they can be used as dictionary keys and they signal to readers that the data is fixed, such as "
     "a pair of coordinates. Use a list when the collection grows or changes."),
    ("How do I keep cut apples from turning brown?",
     "The browning comes from an enzyme reacting with oxygen. To slow it, toss the slices in a little lemon "
     "juice, or soak them for a few minutes in salted water (about half a teaspoon of salt per cup), then "
     "rinse. Keeping them cold and in an airtight container also helps. Honey water works too if you prefer "
     "a sweeter taste."),
    ("Can you explain what compound interest is?",
     "Compound interest means you earn interest on your interest. Suppose you save 1,000 dollars at 5 percent "
     "a year. After one year you have 1,050. In the second year the 5 percent applies to 1,050, so you earn "
     "52.50 instead of 50. Over many years this snowballs, which is why starting to save early matters more "
     "than the exact amount you put in."),
    ("What should I pack for a three-day hiking trip?",
     "Start with the essentials: a tent or shelter, a sleeping bag rated for the night temperatures, a "
     "sleeping pad, and a stove with fuel. Add water treatment, enough food plus one spare meal, layers of "
     "clothing including a rain jacket, a map and compass, a headlamp, a first aid kit, sun protection and a "
     "small repair kit. Keep the total weight under a fifth of your body weight if you can."),
    ("What does the git rebase command do?",
     "git rebase moves a series of commits so that they start from a new base commit. For example, if your "
     "feature branch started from an old version of main, rebasing onto the current main replays your commits "
     "on top of it, as if you had started your work today. The result is a straight history without merge "
     "commits. Avoid rebasing commits that others have already pulled, because it rewrites their identity."),
    ("Why is the sky blue?",
     "Sunlight contains all colours. When it passes through the atmosphere, the tiny gas molecules scatter "
     "short wavelengths much more strongly than long ones. Blue light is scattered in every direction across "
     "the sky, so wherever you look you see some of it. At sunset the light crosses much more air, most of "
     "the blue is scattered away before it reaches you, and the remaining reds and oranges dominate."),
    ("How can I fall asleep faster?",
     "Keep a regular schedule, even on weekends, so your body expects sleep at the same time. Dim the lights "
     "and put screens away for the last half hour before bed. Keep the bedroom cool, dark and quiet. Avoid "
     "caffeine after early afternoon and heavy meals late in the evening. If you lie awake for more than "
     "twenty minutes, get up and do something calm until you feel sleepy."),
]

MULTI_TURN = [
    [("I want to bake bread but I have never done it. Where do I start?",
      "A simple no-knead loaf is a great first bread. You only need flour, water, salt and yeast, and time "
      "does most of the work."),
     ("How long does the dough need to rise?",
      "For a no-knead dough, let it rise covered at room temperature for 12 to 18 hours. It is ready when the "
      "surface is bubbly and it has roughly doubled."),
     ("And how hot should the oven be?",
      "Preheat to about 230 degrees Celsius with a heavy pot inside. Bake covered for 30 minutes, then "
      "uncovered for 15 more until the crust is deep brown.")],
    [("My Python script says 'ModuleNotFoundError: No module named requests'.",
      "That means the requests package is not installed in the Python environment running your script."),
     ("How do I install it?",
      "Run 'python -m pip install requests' with the same python you use to run the script. Using "
      "'python -m pip' makes sure the package goes into that interpreter's environment.")],
    [("I'm visiting Lisbon for two days. Any tips?",
      "Walk the Alfama district early in the morning, ride tram 28 before the crowds, and watch the sunset "
      "from one of the miradouros, the city's viewpoints."),
     ("What food should I try?",
      "Try pastel de nata, the custard tart, grilled sardines if it is summer, and bacalhau, the salted cod "
      "that appears in dozens of dishes.")],
    [("What is a derivative in calculus?",
      "A derivative measures how fast a function changes at a point: the slope of its graph there."),
     ("What is the derivative of x squared?",
      "The derivative of x squared is 2x. At x equals 3, for example, the slope of the curve is 6."),
     ("And of x cubed?", "The derivative of x cubed is 3x squared, by the same power rule.")],
    [("Can you suggest a name for a grey cat?", "How about Smokey, Ash, Pebble or Earl Grey?"),
     ("Something a bit more unusual?", "You could try Nimbus, Graphite, Tungsten or Pewter.")],
    [("How do I reverse a string in JavaScript?",
      "A common way is to split it into characters, reverse the array and join it back: "
      "str.split('').reverse().join('')."),
     ("Does that work with emoji?",
      "Not always. Emoji can use two code units, and split('') breaks them apart. Use Array.from(str) "
      "instead of split(''), which splits by code point: Array.from(str).reverse().join('').")],
    [("I keep forgetting to drink water during the day.",
      "A few habits help: keep a filled bottle on your desk, drink a glass with every meal, and attach a sip "
      "to routines you already have, like checking email."),
     ("Would an app help?",
      "It can. A simple reminder every hour or two works for many people, but turn it off once the habit "
      "sticks so the notifications do not become noise.")],
    [("What is the difference between weather and climate?",
      "Weather is what the atmosphere does over hours and days. Climate is the average pattern of weather "
      "over decades."),
     ("So one cold winter does not disprove global warming?",
      "Right. A single season is weather. Climate trends show up in long-term averages across many years and "
      "many places.")],
]

LONG = [
    ("Write a short guide to writing a good commit message.",
     "A good commit message helps the next person, often you, understand why a change was made.\n\n"
     "1. Start with a short summary line of about fifty characters, written in the imperative mood: "
     "'Fix crash when the config file is empty', not 'Fixed a crash'. It reads like a command that the "
     "commit carries out.\n"
     "2. Leave a blank line after the summary. Many tools treat the first line as the title and the rest as "
     "the body.\n"
     "3. In the body, explain what changed and, more importantly, why. The code already shows how. Mention "
     "the problem you saw, the cause you found, and any alternatives you rejected.\n"
     "4. Keep each commit focused on one logical change. If the summary needs the word 'and', consider "
     "splitting the commit.\n\n"
     "Finally, reread the message as if you had never seen the code. If it would help you in six months, it "
     "is a good message."),
    ("Explain how a refrigerator keeps food cold.",
     "A refrigerator does not create cold; it moves heat from the inside to the outside. It does this with "
     "a refrigerant, a fluid that boils at a very low temperature, pumped around a closed loop.\n\n"
     "Inside the fridge, the refrigerant passes through thin tubes called the evaporator. Here its pressure "
     "is low, so it boils even though the compartment is cold. Boiling takes heat, and the refrigerant "
     "absorbs that heat from the air and food around it.\n\n"
     "The vapour then travels to the compressor, which squeezes it. Compressing a gas raises its temperature, "
     "so the refrigerant leaves the compressor hotter than the kitchen.\n\n"
     "Next it flows through the condenser coils, usually on the back or underneath. Because it is hotter than "
     "the room, it gives its heat away to the kitchen air and condenses back into a liquid.\n\n"
     "Finally the liquid passes through an expansion valve, where the pressure drops sharply, it cools, and "
     "the cycle begins again. That is why the back of a fridge feels warm: it is releasing the heat taken "
     "from your food."),
    ("What are the main differences between TCP and UDP?",
     "TCP and UDP are the two main transport protocols on the internet, and they make opposite trade-offs.\n\n"
     "TCP is connection-oriented. The two sides perform a handshake before sending data. It guarantees that "
     "bytes arrive in order and without gaps: lost packets are retransmitted, and the receiver acknowledges "
     "what it has received. TCP also adapts its sending rate to avoid overwhelming the network, which is "
     "called congestion control. The cost is extra latency and overhead.\n\n"
     "UDP is connectionless. Each datagram is sent on its own, with no handshake, no acknowledgements and no "
     "retransmission. Packets can arrive out of order, twice, or not at all. In exchange, UDP is simple and "
     "fast, and the application decides how to handle loss.\n\n"
     "Web pages and file transfers use TCP because every byte matters; live calls and games often use UDP, "
     "because a late packet is worse than a missing one."),
    ("How does a hash table work?",
     "A hash table stores key-value pairs so that looking up a key takes about the same time no matter how "
     "many entries there are.\n\n"
     "It keeps an array of slots, often called buckets. To store a pair, it runs the key through a hash "
     "function, which turns the key into a large integer. Taking that integer modulo the array size gives a "
     "slot index, and the pair goes there. To look a key up, it hashes the key again and goes straight to the "
     "same slot.\n\n"
     "Two different keys can land in the same slot; this is a collision. One approach, chaining, keeps a "
     "small list in each slot. Another, open addressing, probes for the next free slot using a fixed rule.\n\n"
     "When the table gets too full, it allocates a larger array and reinserts every entry. Python "
     "dictionaries and JavaScript objects are built on this idea."),
]


def build_examples(seed: int = SEED) -> list[dict]:
    """The 64 benchmark conversations, in a fixed shuffled order (the same on every call)."""
    rng = random.Random(seed)
    pairs = list(SHORT_QA)
    pairs += [_arithmetic(rng) for _ in range(6)]
    pairs += [_conversion(rng) for _ in range(4)]
    examples: list[list[tuple[str, str]]] = [[qa] for qa in pairs]
    examples += [[qa] for qa in MEDIUM]
    examples += [list(turns) for turns in MULTI_TURN]
    examples += [[qa] for qa in LONG]
    if len(examples) != 64:
        raise AssertionError(f"expected 64 examples, built {len(examples)}")
    rng.shuffle(examples)
    out = []
    for i, turns in enumerate(examples):
        messages = []
        # Every third example carries its own system prompt; the others get the template's default.
        if i % 3 == 0:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[(i // 3) % len(SYSTEM_PROMPTS)]})
        for question, answer in turns:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        out.append({"messages": messages})
    return out


# ---------------------------------------------------------------------------------------------
# More data shapes: short uniform chats and long documents (issue: throughput on every kind of data)
# ---------------------------------------------------------------------------------------------

SHORT_PATH = DATA_PATH.with_name("short.jsonl")
LONG_PATH = DATA_PATH.with_name("long.jsonl")

_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Perth", "Krakow", "Osaka", "Tunis", "Bergen",
           "Cusco", "Dakar", "Porto", "Tallinn", "Seville"]
_ITEMS = [("a bicycle", "pedals", "gears"), ("a kettle", "spout", "heating element"),
          ("a lighthouse", "lamp", "lens"), ("a violin", "bow", "strings"), ("a sailboat", "mast", "keel"),
          ("a microscope", "eyepiece", "objective lens"), ("a greenhouse", "glass panes", "vents"),
          ("a printer", "print head", "paper tray")]
_UNITS = [("litres", "gallons", 0.264172), ("kilograms", "pounds", 2.20462), ("metres", "feet", 3.28084),
          ("kilometres", "miles", 0.621371)]


def _single_turn(pairs) -> list[dict]:
    """One user turn and one assistant turn per (question, answer), in order."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def _short_pair(i: int, rng: random.Random) -> tuple[str, str]:
    kind = i % 4
    if kind == 0:
        city, n = _CITIES[i % len(_CITIES)], rng.randint(3, 9)
        return (f"I have {n} hours in {city}. What should I do first?",
                f"With {n} hours in {city}, start with a short walk through the old centre, then pick one "
                f"museum or viewpoint and leave time for a relaxed meal near the water.")
    if kind == 1:
        thing, part_a, part_b = _ITEMS[i % len(_ITEMS)]
        return (f"What are the main parts of {thing}?",
                f"The main parts of {thing} are the {part_a} and the {part_b}; together they let it do its "
                f"job, and both need a quick check now and then to keep it working well.")
    if kind == 2:
        src, dst, factor = _UNITS[i % len(_UNITS)]
        x = rng.randint(4, 90)
        return (f"Convert {x} {src} to {dst}, please.",
                f"{x} {src} is about {x * factor:.1f} {dst}. The factor is {factor}, so multiply the number of "
                f"{src} by it and round to one decimal place.")
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return (f"Can you check my sum: is {a} plus {b} equal to {a + b + (i % 3) - 1}?",
            f"{a} plus {b} is {a + b}, so " + ("yes, your sum is right." if i % 3 == 1 else
                                                f"no, your answer is off by {abs((i % 3) - 1)}.")
            + " Adding the tens first and then the units is a quick way to check.")


def build_short_examples(seed: int = SEED, count: int = 48) -> list[dict]:
    """Short single-turn chats of nearly uniform length (about 90-110 tokens with the template's
    default system prompt): where matrices are small and per-layer overhead dominates."""
    rng = random.Random(seed + 1)
    return _single_turn(_short_pair(i, rng) for i in range(count))


_SECTIONS = ["Background", "Progress", "Risks", "Budget", "Staffing", "Schedule", "Customer feedback", "Next steps"]
_TEAMS = ["platform", "payments", "mobile", "search", "data", "support", "security", "design"]
_VERBS = ["finished", "started", "paused", "reviewed", "simplified", "measured", "documented", "tested"]
_OBJECTS = ["the billing service", "the onboarding flow", "the nightly import", "the search index",
            "the release checklist", "the audit log", "the mobile login", "the reporting dashboard"]


def _report(i: int, rng: random.Random) -> tuple[str, str]:
    project = f"Project {chr(65 + i % 26)}{i // 26 + 1}"
    paragraphs = []
    for section in rng.sample(_SECTIONS, 6):
        sentences = []
        for _ in range(4):
            team, verb, obj = rng.choice(_TEAMS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            pct, weeks = rng.randint(5, 95), rng.randint(1, 12)
            sentences.append(f"The {team} team {verb} work on {obj}, which is now {pct} percent complete "
                             f"and expected to need about {weeks} more weeks.")
        paragraphs.append(f"{section}. " + " ".join(sentences))
    document = f"{project} status report.\n\n" + "\n\n".join(paragraphs)
    summary_bits = []
    for section in _SECTIONS[:4]:
        team, obj, pct = rng.choice(_TEAMS), rng.choice(_OBJECTS), rng.randint(10, 90)
        summary_bits.append(f"{section}: the {team} team reports {obj} at about {pct} percent.")
    answer = (f"Summary of the {project} report. " + " ".join(summary_bits)
              + " Overall the project is on track, with the main risk in scheduling; the next review should "
                "confirm the remaining weeks per team and whether any work can run in parallel.")
    return f"Please summarise this report in a short paragraph.\n\n{document}", answer


def build_long_examples(seed: int = SEED, count: int = 16) -> list[dict]:
    """Long single-turn chats (a ~700-900-token report to summarise): long rows, big matrices,
    attention cost growing with length."""
    rng = random.Random(seed + 2)
    return _single_turn(_report(i, rng) for i in range(count))


SHAPES = {"chat": (DATA_PATH, build_examples), "short": (SHORT_PATH, build_short_examples),
          "long": (LONG_PATH, build_long_examples)}
"""Every benchmark data shape: name → (kept file, generator)."""


def _jsonl(examples: list[dict]) -> str:
    return "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples)


def write_dataset(path: Path = DATA_PATH, build=build_examples) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_jsonl(build()), encoding="utf-8")
    return path


def load_examples(path: Path = DATA_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


FILLER = (
    "The committee reviewed the quarterly figures, discussed the schedule for the spring release, and agreed "
    "to meet again after the testing phase. Each team summarised its progress, listed open risks, and "
    "proposed next steps for the coming weeks. "
)


def synthetic_examples(tokenizer, length: int, count: int) -> list[dict]:
    """``count`` chat examples whose rendered length is exactly ``length`` tokens (with the template).

    Each is one user question and a long assistant answer made of neutral filler text; the answer is
    trimmed token by token until the whole rendered conversation has the requested length.
    """
    question = "Summarise the meeting notes."
    prompt_len = len(_render_ids(tokenizer, [{"role": "user", "content": question}], generation_prompt=True))
    # ChatML closes the answer with "<|im_end|>\n": two tokens after the content.
    budget = length - prompt_len - 2
    if budget < 4:
        raise ValueError(f"length {length} is too short for a chat example (prompt alone is {prompt_len})")
    filler_ids = tokenizer(FILLER * (budget // 20 + 4), add_special_tokens=False)["input_ids"]
    out = []
    for i in range(count):
        ids = filler_ids[i % 7: i % 7 + budget]
        answer = tokenizer.decode(ids)
        # Decoding then re-encoding can merge or split tokens at the edges; adjust until exact.
        for _ in range(20):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            n = len(_render_ids(tokenizer, messages))
            if n == length:
                break
            if n > length:
                answer = tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"][: -(n - length)])
            else:
                answer = answer + " ok" * (length - n)
        else:
            raise AssertionError(f"could not synthesise an example of exactly {length} tokens")
        out.append({"messages": messages})
    return out


def _render_ids(tokenizer, messages, generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset",
                                     description="Write the benchmark datasets (bench/data/*.jsonl).")
    parser.add_argument("--check", action="store_true", help="only verify the kept files match the generators")
    args = parser.parse_args(argv)
    failed = 0
    for name, (path, build) in SHAPES.items():
        if args.check:
            ok = path.is_file() and path.read_text(encoding="utf-8") == _jsonl(build())
            print(f"{path}: {'matches the generator' if ok else 'DIFFERS from the generator'}")
            failed += not ok
        else:
            print(write_dataset(path, build))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
